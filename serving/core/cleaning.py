"""Make the engine's JSON conform to OpenAI's published response schemas.

vLLM's raw responses carry ``null`` where the spec wants a field absent (``usage
.prompt_tokens_details``, ``service_tier``, ``message.audio``...) and its own extras
(``prompt_logprobs``, ``kv_transfer_params``...). We drop null-valued fields except
those the spec requires to be present even when null, drop vLLM's extras by name (with
values too: an echo's ``prompt_token_ids``, a stop string's ``stop_reason``), name the
model the way the client asked for it, and put the served version in
``system_fingerprint``.
"""

from __future__ import annotations

from typing import Any

from models.types import ServedVersion

JSON = dict[str, Any]

# Fields the spec marks required-and-nullable somewhere in our responses.
KEEP_NULL = frozenset({"content", "refusal", "logprobs", "finish_reason"})

# vLLM's fields that OpenAI's chat and completion objects (and chunks) do not have
# (vllm/entrypoints/openai/{chat_completion,completion}/protocol.py): popped by name,
# a few dict lookups per chunk, never a walk.
VLLM_TOP = (
    "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
    "ec_transfer_params", "metrics",
)  # fmt: skip
VLLM_CHOICE = ("stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts")


def drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: drop_nulls(v) if isinstance(v, dict | list) else v
            for k, v in value.items()
            if v is not None or k in KEEP_NULL
        }
    if isinstance(value, list):
        if value and isinstance(value[0], float | int | str):
            return value  # an embedding, token ids: nothing to clean, nothing to walk
        return [drop_nulls(v) for v in value]
    return value


def fingerprint(served: ServedVersion) -> str:
    return f"weir-{served.model}@{served.version}"


def clean_generation(body: JSON, requested_model: str, served: ServedVersion) -> JSON:
    """A chat completion, a completion, or one chunk of either."""
    cleaned: JSON = drop_nulls(body)
    for key in VLLM_TOP:
        cleaned.pop(key, None)
    cleaned["model"] = requested_model
    cleaned["system_fingerprint"] = fingerprint(served)
    chat = str(cleaned.get("object", "")).startswith("chat.completion")
    for choice in cleaned.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        for key in VLLM_CHOICE:
            choice.pop(key, None)
        logprobs = choice.get("logprobs") if chat else None
        if isinstance(logprobs, dict):
            logprobs.setdefault("refusal", None)  # required (nullable); vLLM leaves it out
    return cleaned


def clean_embeddings(body: JSON, requested_model: str, served: ServedVersion) -> JSON:
    cleaned: JSON = drop_nulls(body)
    cleaned["model"] = requested_model
    cleaned.pop("created", None)
    cleaned.pop("id", None)
    return cleaned
