"""The request contract: configured maxima, unknown fields, and the token budget.

Runs after the wire model validated the body and before any engine is called. It counts
the prompt with the served version's own tokenizer, refuses a prompt plus ``max_tokens``
that would overflow the context (400 ``context_length_exceeded``, both numbers in the
message), and fills in ``max_tokens`` from what remains of the context when the client
left it out. The prompt token count it returns is what later limits charge.

Every prompt of a list counts: its tokens are summed, and its completions are reserved.
A prompt longer in characters than the counter's ``max_chars`` is refused before it is
tokenized (no text that long fits the context), and ``prepare_async`` counts large prompts
in a small thread pool, so that tokenizing never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from jinja2 import TemplateError

from models.tokenizer import TokenCounter
from serving.core import output_check, tools
from serving.errors import ContextLengthExceeded, InvalidRequest
from serving.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImagePart,
    ModelRequest,
)
from serving.settings import ContractConfig

log = logging.getLogger("weir.contract")
JSON = dict[str, Any]
R = TypeVar("R", bound=ModelRequest)
# Prompts of more characters than this are counted off the event loop (about 2 ms of
# tokenizing at worst inline; the hop to a thread costs tens of microseconds).
OFF_LOOP_CHARS = 2048
COUNTING_THREADS = 4  # large prompts counted at once; the rest wait for a thread
_pool: ThreadPoolExecutor | None = None

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
    prompt_tokens: int | None  # every prompt's; None when the version has no local tokenizer
    # Completion tokens one choice can take, over every prompt of the request: the body's
    # max_tokens times the number of prompts (a completions list answers each prompt). The
    # limiter reserves prompt_tokens + max_tokens * n.
    max_tokens: int | None
    counts: tuple[int, ...] = ()  # embeddings: each input's tokens (a cache hit's are not due)


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


# vLLM samples greedily below this temperature (``vllm.sampling_params._SAMPLING_EPS``) and
# then refuses n > 1 ("n must be 1 when using greedy sampling"), unless it beam-searches.
GREEDY_BELOW = 1e-5


def _check_n(request: ChatCompletionRequest | CompletionRequest, config: ContractConfig) -> None:
    n = request.n
    if n == 1:
        return
    if n > config.max_n:
        raise InvalidRequest(
            f"n is {n}; at most {config.max_n} is allowed (contract.max_n).", param="n"
        )
    temperature = request.temperature
    if (
        temperature is not None
        and temperature < GREEDY_BELOW
        and not (request.model_extra or {}).get("use_beam_search")
    ):
        raise InvalidRequest(
            f"n is {n}, but temperature {temperature} means greedy sampling, which gives"
            " one answer. Ask for n=1, or a temperature above 0.",
            param="n",
        )


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
    # bounded, local references only, a valid schema: before any engine is called
    output_check.check_request_schema(schema, param="response_format.json_schema.schema")


def _check_image_urls(request: ChatCompletionRequest, config: ContractConfig) -> None:
    """An image part's URL is a ``data:`` URL, or http(s) on a host the configuration
    names (``contract.image_url_hosts``): a multimodal engine fetches any other URL from
    its own network, where a tenant must not make it reach (internal addresses, files)."""
    for i, message in enumerate(request.messages):
        content = message.content
        if not isinstance(content, list):
            continue  # text: the common case, one check a message
        for j, part in enumerate(content):
            if not isinstance(part, ImagePart):
                continue
            param = f"messages[{i}].content[{j}].image_url.url"
            found = part.image_url.get("url") if isinstance(part.image_url, dict) else None
            if not isinstance(found, str):
                raise InvalidRequest("An image part needs image_url.url, a string.", param=param)
            if found[:5].lower() == "data:":
                continue
            url = urlsplit(found)
            if url.scheme.lower() in ("http", "https") and (url.hostname or "") in {
                host.lower() for host in config.image_url_hosts
            }:
                continue
            allowed = ", ".join(config.image_url_hosts) or "none configured"
            raise InvalidRequest(
                "An image must be sent in the request as a data: URL, or be an http(s) URL on"
                f" a host in contract.image_url_hosts ({allowed}).",
                param=param,
            )


def prepare_chat(
    request: ChatCompletionRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    if len(request.messages) > config.max_messages:
        raise InvalidRequest(
            f"{len(request.messages)} messages; at most {config.max_messages} are allowed.",
            param="messages",
        )
    _check_image_urls(request, config)
    _check_n(request, config)
    check_response_format(request.response_format)
    tools.check_tools(request)
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    requested = request.max_completion_tokens or request.max_tokens
    _check_requested(requested, config, param)
    body = request.model_dump(exclude_unset=True)
    if counter is None:
        return Prepared(body, None, requested)
    if not counter.calls_tools and tools.calls_tools(body):
        raise InvalidRequest(
            "This model does not call tools: its chat template renders none, or its version"
            ' sets tool_parser = "off". Send tool_choice "none" or no tools.',
            param="tools",
        )
    try:
        text = counter.render_chat(body["messages"], tools.rendered(body.get("tools")))
    except TemplateError as exc:
        raise InvalidRequest(
            f"The messages do not fit the model's chat template: {exc}", param="messages"
        ) from exc
    _check_chars(len(text), counter, "messages", "the rendered conversation")
    prompt = counter.count_rendered(text)
    budget = _budget(prompt, requested, counter, "messages")
    if requested is None:
        body["max_tokens"] = budget
    return Prepared(body, prompt, budget)


def prepare_completion(
    request: CompletionRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    _check_n(request, config)
    _check_requested(request.max_tokens, config, "max_tokens")
    body = request.model_dump(exclude_unset=True)
    prompts = _prompt_list(request.prompt)
    if not prompts:
        raise InvalidRequest("prompt is empty.", param="prompt")
    if counter is None:
        each = request.max_tokens
        return Prepared(body, None, None if each is None else each * len(prompts))
    counts = _prompt_counts(prompts, counter, "prompt")
    budget = min(_budget(c, request.max_tokens, counter, "prompt") for c in counts)
    if request.max_tokens is None:
        body["max_tokens"] = budget
    return Prepared(body, sum(counts), budget * len(prompts))


def _prompt_list(
    prompt: str | list[str] | list[int] | list[list[int]],
) -> list[str] | list[list[int]]:
    """A prompt as the list of prompts it is: one text, one token-id list, or many."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        return []
    if isinstance(prompt[0], int):
        return [[i for i in prompt if isinstance(i, int)]]
    if isinstance(prompt[0], str):
        return [p for p in prompt if isinstance(p, str)]
    return [p for p in prompt if isinstance(p, list)]


def _check_chars(chars: int, counter: TokenCounter, param: str, what: str) -> None:
    """Refuses a text too long to fit the context whatever its tokens, before counting."""
    if counter.max_chars is not None and chars > counter.max_chars:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {counter.context} tokens; {what} has"
            f" {chars} characters, more than the {counter.max_chars} that so many tokens of"
            " this model's tokenizer can hold.",
            param=param,
        )


def _prompt_counts(
    prompts: list[str] | list[list[int]], counter: TokenCounter, param: str
) -> list[int]:
    texts = [p for p in prompts if isinstance(p, str)]
    if not texts:
        return [len(p) for p in prompts]
    for index, text in enumerate(texts):
        what = f"{param} {index}" if len(texts) > 1 else f"the {param}"
        _check_chars(len(text), counter, param, what)
    return counter.count_texts(texts)


def prepare_embeddings(
    request: EmbeddingRequest, counter: TokenCounter | None, config: ContractConfig
) -> Prepared:
    check_fields(request, config)
    count = request.input_count()
    if count == 0:
        raise InvalidRequest("input is empty.", param="input")
    _check_no_empty_text(request.input)
    if count > config.max_embedding_inputs:
        raise InvalidRequest(
            f"{count} inputs; at most {config.max_embedding_inputs} are allowed.", param="input"
        )
    body = request.model_dump(exclude_unset=True)
    if counter is None:
        return Prepared(body, None, None)
    counts = _prompt_counts(_prompt_list(request.input), counter, "input")
    longest = max(counts)
    if longest > counter.context:
        index = counts.index(longest)
        raise ContextLengthExceeded(
            f"This model's maximum context length is {counter.context} tokens; input {index}"
            f" has {longest} tokens.",
            param="input",
        )
    return Prepared(body, sum(counts), None, tuple(counts))


def _check_no_empty_text(inputs: str | list[str] | list[int] | list[list[int]]) -> None:
    """OpenAI's embeddings input "cannot be an empty string", alone or in a list."""
    if inputs == "":
        raise InvalidRequest("input cannot be an empty string.", param="input")
    if isinstance(inputs, list) and isinstance(inputs[0], str) and "" in inputs:
        index = inputs.index("")
        raise InvalidRequest(
            f"input[{index}] is an empty string; no input can be.", param=f"input[{index}]"
        )


def prompt_chars(request: ModelRequest) -> int:
    """About how many characters counting this request's prompt means: cheap to work out
    (no rendering, no tokenizing), and never much less than the truth."""
    own = getattr(request, "text_chars", None)  # a pass-through request says (passthrough)
    if callable(own):
        return int(own())
    if isinstance(request, ChatCompletionRequest):
        chars = _json_chars(request.tools) if request.tools else 0
        for message in request.messages:
            content = message.content
            if isinstance(content, str):
                chars += len(content)
            elif content is not None:
                chars += sum(len(getattr(part, "text", "")) for part in content)
            if message.tool_calls:
                chars += _json_chars(message.tool_calls)
            if message.model_extra:
                chars += _json_chars(message.model_extra)
        return chars
    prompt = getattr(request, "prompt", getattr(request, "input", None))
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, str | list) else 1 for p in prompt)
    return 0


def _json_chars(value: Any) -> int:
    """Characters in the strings of free-form JSON (its depth is bounded by the wire model)."""
    total = 0
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, dict):
            total += sum(len(k) for k in node if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


def _counting_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(COUNTING_THREADS, thread_name_prefix="weir-count")
    return _pool


async def prepare_async(
    prepare: Callable[[R, TokenCounter | None, ContractConfig], Prepared],
    request: R,
    counter: TokenCounter | None,
    config: ContractConfig,
    body_bytes: int | None = None,
) -> Prepared:
    """``prepare(request, counter, config)``, in the counting pool when the prompt is large
    enough that tokenizing it would hold up the event loop (the tokenizer releases the GIL
    while it works); inline otherwise. ``body_bytes``: the size of the JSON the request
    came as, when it is still that request (its prompt has at most that many characters:
    no walk over its messages is needed to know a small request is small)."""
    small = body_bytes is not None and body_bytes <= OFF_LOOP_CHARS
    if counter is None or small or prompt_chars(request) <= OFF_LOOP_CHARS:
        return prepare(request, counter, config)
    call = functools.partial(prepare, request, counter, config)
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_counting_pool(), context.run, call)
