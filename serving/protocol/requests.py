"""Request bodies for the OpenAI routes we serve.

Fields follow OpenAI's API. Unknown fields are kept (``extra="allow"``) and passed to
the engine, which may understand them (vLLM's extensions); numeric fields have bounds.

Everything a client can make large is bounded here, before any other work: list lengths
(messages, prompts, inputs, token ids, stop strings, ``logit_bias`` entries), the length of
each stop string, and how deeply free-form JSON (unknown fields, ``tool_calls``, ``tools``)
nests (``response_format``: by its schema check); whatever passes can be hashed, logged and
sent on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_TOKENS = 1_000_000
MAX_MESSAGES = 2048
MAX_STOP = 4
MAX_STOP_CHARS = 1024  # per stop string: the engine matches each against every new token
MAX_EMBED_INPUTS = 2048
MAX_PROMPTS = 2048  # strings or token-id lists in one /v1/completions prompt
MAX_PROMPT_IDS = MAX_TOKENS  # token ids in one prompt: no context is longer than this
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows; each bias in -100..100
MAX_JSON_DEPTH = 32  # nesting of free-form JSON: far under orjson's 255 and the stack


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels deep; iterative
    and stops at the first container past ``limit``, so any depth is safe to ask about."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _shallow(value: Any) -> Any:
    if isinstance(value, dict | list) and too_deep(value):
        raise PydanticCustomError(
            "json_too_deep",
            "nested more than {limit} levels deep",
            {"limit": MAX_JSON_DEPTH},
        )
    return value


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # logit_bias keys, as strings
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
Json = Annotated[dict[str, Any], AfterValidator(_shallow)]  # free-form, bounded depth


def _counted(limit: int, what: str) -> BeforeValidator:
    """A list of texts or token-id lists refused by its length alone, before any of it is
    validated (and with a message that says so, not a union's four complaints)."""

    def check(value: Any) -> Any:
        if not isinstance(value, list) or not value:
            return value
        if isinstance(value[0], int):
            if len(value) > MAX_PROMPT_IDS:
                raise PydanticCustomError(
                    "too_long",
                    "{count} token ids; at most {limit} are allowed",
                    {"count": len(value), "limit": MAX_PROMPT_IDS},
                )
        elif len(value) > limit:
            raise PydanticCustomError(
                "too_long",
                "{count} {what}; at most {limit} are allowed",
                {"count": len(value), "what": what, "limit": limit},
            )
        return value

    return BeforeValidator(check)


Ids = Annotated[list[int], Field(max_length=MAX_PROMPT_IDS)]
Texts = str | list[str] | Ids | list[Ids]
Prompt = Annotated[Texts, _counted(MAX_PROMPTS, "prompts")]
EmbedInput = Annotated[Texts, _counted(MAX_EMBED_INPUTS, "inputs")]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _shallow_extras(self) -> Self:
        """Unknown fields are passed on, hashed and logged: none may nest past the bound."""
        for name, value in (self.__pydantic_extra__ or {}).items():
            if isinstance(value, dict | list) and too_deep(value):
                raise PydanticCustomError(
                    "json_too_deep",
                    "field '{field}' is nested more than {limit} levels deep",
                    {"field": name[:64], "limit": MAX_JSON_DEPTH},
                )
        return self


class StreamOptions(_Open):
    include_usage: bool = False


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: Json


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[Json] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        """Only an assistant message may leave out its content (OpenAI's API)."""
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise PydanticCustomError(
                "missing_content", "a '{role}' message needs content", {"role": role}
            )
        return value


class ModelRequest(_Open):
    """Any request addressed to a model by its public name (or ``name@version``)."""

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False


class _Sampling(ModelRequest):
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int = Field(1, ge=1)  # at most contract.max_n (itself at most 16): the contract's check
    stop: Stop | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[TokenId, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None  # bounded by output_check's schema check
    tools: list[Json] | None = None
    tool_choice: str | Json | None = None


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None


class EmbeddingRequest(ModelRequest):
    input: EmbedInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = Field(None, max_length=256)

    def input_count(self) -> int:
        if isinstance(self.input, str):
            return 1
        if self.input and isinstance(self.input[0], int):
            return 1
        return len(self.input)
