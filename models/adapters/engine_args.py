"""The flags and environment that let an engine Weir starts serve LoRA adapters.

vLLM serves adapters only when started with ``--enable-lora`` (with ``--max-loras``, how
many it holds at once, and ``--max-lora-rank``, the largest rank it accepts), and loads
and unloads them at runtime (``/v1/load_lora_adapter``) only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. Weir loads every adapter at runtime, also
those it knows at start, so a restarted or added replica is filled the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import VersionConfig

RUNTIME_UPDATES = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def engine_args(version: VersionConfig) -> list[str]:
    if not version.lora_enabled:
        return []
    return [
        "--enable-lora",
        "--max-loras",
        str(version.max_loras),
        "--max-cpu-loras",
        str(version.max_loras),
        "--max-lora-rank",
        str(version.max_lora_rank),
    ]


def engine_env(version: VersionConfig) -> dict[str, str]:
    """Added to the engine's environment (the version's own ``env`` still wins)."""
    return {RUNTIME_UPDATES: "True"} if version.lora_enabled else {}
