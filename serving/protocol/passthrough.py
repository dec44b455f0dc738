"""Request bodies for vLLM's own routes that the gateway passes through: ``/v1/rerank``,
``/v1/score``, ``/tokenize`` and ``/detokenize``.

Fields follow vLLM's protocol models (``vllm.entrypoints.pooling.scoring.protocol``,
``vllm.entrypoints.serve.tokenize.protocol``), text only (the models we serve read text),
and every one a client can make large has a bound: how many documents or texts, how long
each is, how many token ids. Unknown fields are kept and passed on, as on the OpenAI
routes (``contract.check_fields`` says what it does with them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serving.protocol.requests import MAX_MESSAGES, MAX_TOKENS, ChatMessage, Json, ModelRequest

MAX_DOCUMENTS = 1024  # documents in one rerank; texts on one side of a score
MAX_TEXT_CHARS = 65_536  # one query, document or score text (engines truncate by tokens)
MAX_TOKENIZE_CHARS = 1_000_000  # the prompt of one /tokenize (counting it is the point)
MAX_DETOKENIZE_IDS = 1_000_000  # token ids in one /detokenize
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary comes near it
MAX_TOOLS = 128  # as on chat completions

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_DOCUMENTS)]
ScoreSide = Text | Texts
TokenLimit = Annotated[int, Field(ge=0, le=MAX_TOKENS)]


class _Pooling(ModelRequest):
    """What vLLM's scoring routes share (``ScoringRequestMixin``)."""

    user: str | None = Field(None, max_length=256)
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=MAX_TOKENS)
    truncation_side: Literal["left", "right"] | None = None
    padding: Literal["max_length", "do_not_pad"] | None = None
    use_activation: bool | None = None
    max_tokens_per_query: TokenLimit | None = None
    max_tokens_per_doc: TokenLimit | None = None
    instruction: Text | None = None
    chat_template_kwargs: Json | None = None

    def texts(self) -> list[str]:
        """Every text the engine will tokenize (what the request is counted by)."""
        raise NotImplementedError

    def text_chars(self) -> int:
        """About how many characters counting this request means (``contract.prompt_chars``)."""
        return sum(len(text) for text in self.texts())


def _listed(side: str | list[str]) -> list[str]:
    return [side] if isinstance(side, str) else list(side)


class RerankRequest(_Pooling):
    """vLLM's (and Jina's, Cohere's) rerank: ``documents`` ranked by relevance to ``query``."""

    query: Text
    documents: ScoreSide
    top_n: int = Field(0, ge=0, le=MAX_DOCUMENTS)  # 0: every document

    def texts(self) -> list[str]:
        return [self.query, *_listed(self.documents)]


# vLLM's four ways of naming the two sides of a score, in the order it tries them
SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
               ("text_1", "text_2"))  # fmt: skip


class ScoreRequest(_Pooling):
    """vLLM's score: each text of one side against the other's (1:1, 1:N or N:N)."""

    text_1: ScoreSide | None = None
    text_2: ScoreSide | None = None
    queries: ScoreSide | None = None
    documents: ScoreSide | None = None
    items: ScoreSide | None = None
    data_1: ScoreSide | None = None
    data_2: ScoreSide | None = None

    @model_validator(mode="after")
    def _one_pair(self) -> Self:
        given = [name for pair in SCORE_PAIRS for name in pair if getattr(self, name) is not None]
        complete = [p for p in SCORE_PAIRS if all(getattr(self, n) is not None for n in p)]
        if len(complete) != 1 or len(set(given)) != len(complete[0]):
            raise PydanticCustomError(
                "score_pair",
                "give exactly one pair of sides: text_1 and text_2, queries and documents,"
                " queries and items, or data_1 and data_2",
            )
        return self

    def sides(self) -> tuple[list[str], list[str]]:
        for first, second in SCORE_PAIRS:
            one, two = getattr(self, first), getattr(self, second)
            if one is not None and two is not None:
                return _listed(one), _listed(two)
        return [], []  # unreachable: the validator insists on one pair

    def texts(self) -> list[str]:
        one, two = self.sides()
        return one + two


class TokenizeRequest(ModelRequest):
    """vLLM's tokenize, of a ``prompt`` or of ``messages`` as the chat template renders
    them (the count a chat completion's ``prompt_tokens`` says)."""

    prompt: str | None = Field(None, max_length=MAX_TOKENIZE_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    tools: list[Json] | None = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: Json | None = None
    chat_template: Any = None  # refused below: each model is served with its own template

    @field_validator("chat_template")
    @classmethod
    def _no_template(cls, value: Any) -> None:
        if value is not None:
            raise PydanticCustomError(
                "not_allowed",
                "a request's own chat template is not accepted; the model's own renders"
                " the messages",
            )
        return None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError(
                "prompt_or_messages", "give either prompt or messages, not both or neither"
            )
        if self.prompt is not None and (
            self.tools is not None or self.add_generation_prompt is not None
        ):
            raise PydanticCustomError(
                "chat_only", "tools and add_generation_prompt go with messages, not a prompt"
            )
        if self.add_generation_prompt and self.continue_final_message:
            raise PydanticCustomError(
                "generation_prompt",
                "add_generation_prompt and continue_final_message cannot both be true",
            )
        return self

    def text_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        chars = 0
        for message in self.messages or ():
            if isinstance(message.content, str):
                chars += len(message.content)
            elif message.content is not None:
                chars += sum(len(getattr(part, "text", "")) for part in message.content)
        return chars


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class DetokenizeRequest(ModelRequest):
    """vLLM's detokenize: the text of ``tokens``."""

    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE_IDS)

    def text_chars(self) -> int:
        return 0  # nothing is counted: the ids are the count
