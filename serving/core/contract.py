"""The request contract: configured maxima, unknown fields, and the token budget.

Runs after the wire model validated the body and before any engine is called. It counts
the prompt with the served version's own tokenizer, refuses a prompt plus ``max_tokens``
that would overflow the context (400 ``context_length_exceeded``, both numbers in the
message), and fills in ``max_tokens`` from what remains of the context when the client
left it out. The prompt token count it returns is what later limits charge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jsonschema
from jinja2 import TemplateError

from models.tokenizer import TokenCounter
from serving.errors import ContextLengthExceeded, InvalidRequest
from serving.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelRequest,
)
from serving.settings import ContractConfig

log = logging.getLogger("weir.contract")
JSON = dict[str, Any]

# Fields that are not in our wire models but are known: OpenAI's own that we pass on as
# they are, and vLLM's sampling extensions. Anything else is "unknown".
KNOWN_EXTRAS = frozenset(
    {
        "logit_bias", "parallel_tool_calls", "store", "metadata", "service_tier",
        "prediction", "modalities", "audio", "reasoning_effort", "function_call",
        "functions", "suffix", "best_of", "web_search_options", "verbosity",
        "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens",
        "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
        "truncate_prompt_tokens", "add_generation_prompt", "continue_final_message",
        "chat_template_kwargs", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "structured_outputs", "priority", "request_id", "normalize", "weir",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Prepared:
    body: JSON  # what the engine gets (model name still the public one)
    prompt_tokens: int | None  # None when the version has no local tokenizer
    max_tokens: int | None


def check_fields(request: ModelRequest, config: ContractConfig) -> None:
    unknown = sorted(set(request.model_extra or {}) - KNOWN_EXTRAS)
    if not unknown:
        return
    if config.strict_fields:
        raise InvalidRequest(f"Unknown field: {unknown[0]}.", param=unknown[0])
    log.info("unknown request fields passed on: %s", ", ".join(unknown))


def _budget(prompt_tokens: int, requested: int | None, counter: TokenCounter, param: str) -> int:
    context = counter.context
    if requested is None:
        if prompt_tokens >= context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens, and your prompt"
                f" has {prompt_tokens} tokens, which leaves no room for a completion.",
                param=param,
            )
        return context - prompt_tokens
    if prompt_tokens + requested > context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens. However, you requested"
            f" {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt,"
            f" {requested} for the completion). Shorten the prompt or reduce max_tokens.",
            param=param,
        )
    return requested


def _check_n(n: int, config: ContractConfig) -> None:
    if n > config.max_n:
        raise InvalidRequest(f"n is {n}; at most {config.max_n} is allowed.", param="n")


def _check_requested(requested: int | None, config: ContractConfig, param: str) -> None:
    if requested is not None and requested > config.max_tokens:
        raise InvalidRequest(
            f"{param} is {requested}; at most {config.max_tokens} is allowed.", param=param
        )


RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


def check_response_format(response_format: JSON | None) -> None:
    if response_format is None:
        return
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format.type must be one of {sorted(RESPONSE_FORMATS)}.",
            param="response_format.type",
        )
    if kind != "json_schema":
        return
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON Schema object.",
            param="response_format.json_schema.schema",
        )
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(
            f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}",
            param="response_format.json_schema.schema",
        ) from exc


def prepare_chat(
    request: ChatCompletionRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    if len(request.messages) > config.max_messages:
        raise InvalidRequest(
            f"{len(request.messages)} messages; at most {config.max_messages} are allowed.",
            param="messages",
        )
    _check_n(request.n, config)
    check_response_format(request.response_format)
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    requested = request.max_completion_tokens or request.max_tokens
    _check_requested(requested, config, param)
    body = request.model_dump(exclude_unset=True)
    if counter is None:
        return Prepared(body, None, requested)
    try:
        prompt = counter.count_chat(body["messages"], body.get("tools"))
    except TemplateError as exc:
        raise InvalidRequest(
            f"The messages do not fit the model's chat template: {exc}", param="messages"
        ) from exc
    budget = _budget(prompt, requested, counter, "messages")
    if requested is None:
        body["max_tokens"] = budget
    return Prepared(body, prompt, budget)


def prepare_completion(
    request: CompletionRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    _check_n(request.n, config)
    _check_requested(request.max_tokens, config, "max_tokens")
    body = request.model_dump(exclude_unset=True)
    if counter is None:
        return Prepared(body, None, request.max_tokens)
    counts = _prompt_counts(request.prompt, counter)
    if not counts:
        raise InvalidRequest("prompt is empty.", param="prompt")
    budget = min(_budget(c, request.max_tokens, counter, "prompt") for c in counts)
    if request.max_tokens is None:
        body["max_tokens"] = budget
    return Prepared(body, sum(counts), budget)


def _prompt_counts(
    prompt: str | list[str] | list[int] | list[list[int]], counter: TokenCounter
) -> list[int]:
    if isinstance(prompt, str):
        return [counter.count_text(prompt)]
    if not prompt:
        return []
    if isinstance(prompt[0], int):
        return [len(prompt)]
    if isinstance(prompt[0], str):
        return counter.count_texts([p for p in prompt if isinstance(p, str)])
    return [len(p) for p in prompt if isinstance(p, list)]


def prepare_embeddings(
    request: EmbeddingRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    count = request.input_count()
    if count == 0:
        raise InvalidRequest("input is empty.", param="input")
    if count > config.max_embedding_inputs:
        raise InvalidRequest(
            f"{count} inputs; at most {config.max_embedding_inputs} are allowed.", param="input"
        )
    body = request.model_dump(exclude_unset=True)
    if counter is None:
        return Prepared(body, None, None)
    counts = _prompt_counts(request.input, counter)
    longest = max(counts)
    if longest > counter.context:
        index = counts.index(longest)
        raise ContextLengthExceeded(
            f"This model's maximum context length is {counter.context} tokens; input {index}"
            f" has {longest} tokens.",
            param="input",
        )
    return Prepared(body, sum(counts), None)
