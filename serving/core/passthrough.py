"""vLLM's own routes, passed through on the one path: ``/v1/rerank``, ``/v1/score``,
``/tokenize``, ``/detokenize``.

Each is a ``Route`` the proxy serves like the OpenAI routes (keys, limits, pins, metrics,
fallbacks, the error table), never cached, never streamed. Rerank and score need a model
that pools (vLLM serves them from an embedding model, as a bi-encoder); tokenize and
detokenize work on any model. The contract here counts what the engine will tokenize,
for the limits' reservation; the charge is what the engine reports (``usage`` of a rerank
or score, ``count`` of a tokenize), or the ids a detokenize was given.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from models.tokenizer import TokenCounter
from models.types import ServedVersion
from serving.core import tools
from serving.core.answer import total_tokens
from serving.core.contract import Prepared, check_fields
from serving.core.proxy import Route
from serving.errors import InvalidRequest
from serving.protocol.passthrough import (
    DetokenizeRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
)
from serving.protocol.requests import ChatCompletionRequest
from serving.settings import ContractConfig

JSON = dict[str, Any]


def _prepare_scoring(
    request: RerankRequest | ScoreRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    body = request.model_dump(exclude_unset=True)
    if counter is None:
        return Prepared(body, None, None)
    return Prepared(body, sum(counter.count_texts(request.texts())), None)


def prepare_rerank(
    request: RerankRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    return _prepare_scoring(request, counter, config)


def prepare_score(
    request: ScoreRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    return _prepare_scoring(request, counter, config)


def prepare_tokenize(
    request: TokenizeRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    """Counted as the engine will count it where the version has a tokenizer here (the
    prompt, or the messages through the model's chat template); what is charged is the
    engine's ``count``."""
    check_fields(request, config)
    body = request.model_dump(exclude_unset=True)
    if request.messages is not None:  # held to the chat route's rules on tools and messages
        asked = {"model": request.model, "messages": body["messages"], "tools": request.tools}
        tools.check_tools(ChatCompletionRequest.model_validate(asked))
    if counter is None:
        return Prepared(body, None, None)
    if request.prompt is not None:
        return Prepared(body, counter.count_texts([request.prompt])[0], None)
    if not counter.has_chat_template:
        return Prepared(body, None, None)  # the engine says what it can't render
    try:
        text = counter.render_chat(body["messages"], tools.rendered(body.get("tools")))
    except TemplateError as exc:
        raise InvalidRequest(
            f"The messages do not fit the model's chat template: {exc}", param="messages"
        ) from exc
    return Prepared(body, counter.count_rendered(text), None)


def prepare_detokenize(
    request: DetokenizeRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    return Prepared(request.model_dump(exclude_unset=True), len(request.tokens), None)


def clean(body: JSON, requested_model: str, served: ServedVersion) -> JSON:
    """vLLM's answer as it is, naming the model as the client named it."""
    if "model" in body:
        body["model"] = requested_model
    return body


def charge_count(answer: JSON, reserved: int) -> int:
    """A tokenize's charge: the tokens the engine counted."""
    count = answer.get("count")
    return count if isinstance(count, int) else reserved


def charge_reserved(answer: JSON, reserved: int) -> int:
    """A detokenize's charge: the ids it was given (what was reserved)."""
    return reserved


# vLLM serves /v1/rerank and /v1/score too, but logs a deprecation on each: its own paths
RERANK = Route("/v1/rerank", "embed", prepare_rerank, clean, streams=False, cached=False,
               charge=total_tokens, upstream="/rerank")  # fmt: skip
SCORE = Route("/v1/score", "embed", prepare_score, clean, streams=False, cached=False,
              charge=total_tokens, upstream="/score")  # fmt: skip
TOKENIZE = Route("/tokenize", None, prepare_tokenize, clean, streams=False, cached=False,
                 charge=charge_count)  # fmt: skip
DETOKENIZE = Route("/detokenize", None, prepare_detokenize, clean, streams=False, cached=False,
                   charge=charge_reserved)  # fmt: skip
PASSTHROUGH = (RERANK, SCORE, TOKENIZE, DETOKENIZE)
