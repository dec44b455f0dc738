"""Loading and unloading an adapter on one engine: vLLM's runtime LoRA endpoints.

``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and
``POST /v1/unload_lora_adapter {"lora_name"}`` (the engine runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); both answer 200 with a text body. A load of a
name the engine holds already (400 "has already been loaded") counts as loaded; an
unload of a name it does not hold (404) as unloaded. Everything else is
``AdapterLoadFailed`` with the engine's message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import aiohttp

from models.adapters.errors import AdapterLoadFailed
from models.engines.fleet import Replica

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"


class AdapterControl(Protocol):
    async def load(self, replica: Replica, name: str, path: Path) -> None: ...

    async def unload(self, replica: Replica, name: str) -> None: ...


def _message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    inner = body.get("error", body) if isinstance(body, dict) else body
    return str(inner.get("message", inner) if isinstance(inner, dict) else inner)[:300]


class HttpAdapterControl:
    """Over the gateway's aiohttp session, to an engine Weir started (its ``base_url``)."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def __repr__(self) -> str:
        return "HttpAdapterControl()"

    async def _post(self, replica: Replica, path: str, body: dict[str, str]) -> tuple[int, str]:
        base = getattr(replica.engine, "base_url", None)
        if not isinstance(base, str):
            raise AdapterLoadFailed(f"engine {replica.key} has no URL to load adapters through")
        try:
            async with self.session.post(base + path, json=body, timeout=self.timeout) as answer:
                return answer.status, await answer.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AdapterLoadFailed(
                f"engine {replica.key} did not answer {path}: {type(exc).__name__}",
                engine=str(replica.key),
            ) from exc

    async def load(self, replica: Replica, name: str, path: Path) -> None:
        status, text = await self._post(replica, LOAD, {"lora_name": name, "lora_path": str(path)})
        if status == 200 or (status == 400 and "already been loaded" in text):
            return
        raise AdapterLoadFailed(
            f"engine {replica.key} would not load adapter '{name}': HTTP {status} {_message(text)}",
            engine=str(replica.key),
        )

    async def unload(self, replica: Replica, name: str) -> None:
        status, text = await self._post(replica, UNLOAD, {"lora_name": name})
        if status not in (200, 404):
            raise AdapterLoadFailed(
                f"engine {replica.key} would not unload adapter '{name}': HTTP {status}"
                f" {_message(text)}",
                engine=str(replica.key),
            )
