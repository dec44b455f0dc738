"""KV-aware routing's inputs: a prompt's blocks, the replicas' blocks, and its metrics.

``KvRouting`` is made once per gateway for the models whose ``routing.strategy`` is
``kv_aware``: it follows those models' replicas' KV events (``KvIndex``) and turns a
request body into a ``PromptKey``, the prompt's token ids as the engine will see them
(the served version's tokenizer and chat template, ``models.tokenizer``) whose block
hashes (``models.engines.kv_events.BlockHasher``) are computed per block size on demand,
with the extra keys vLLM hashes a LoRA adapter's and a ``cache_salt``'s blocks with. An
adapter whose path the gateway does not know (it did not load it) cannot be hashed as
the engine does: its requests are ``Unmatched`` and routed by load (``adapter_unknown``).

Versions deployed after start are added by the dispatcher (``configure``); their token
counters by the deployer, in the map shared with the proxy (``counters``). A replica's
event endpoints come from ``sources`` first (the fleet board's, for engines a
``weir engines`` supervisor started), then its own process (engines this gateway
started), then its version's configuration (remote engines).

Metrics (bounded labels: model names from config, reasons below, replica keys):
``weir_kv_route_decisions_total{model,reason}``, ``weir_kv_predicted_hit_tokens_total``
and ``weir_kv_routed_prompt_tokens_total`` by model (their ratio: the predicted cache hit
rate), ``weir_kv_index_blocks{replica}`` and ``weir_kv_index_rebuilds_total{replica,why}``.
The engines' own ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` are on their
``/metrics`` (``GET /weir/engines`` lists them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from models.config import ModelConfig, VersionConfig
from models.engines import kv_events, vllm_engine
from models.engines.fleet import Fleet, Replica
from models.engines.kv_events import BlockHasher, EventEndpoints, HashSettings
from models.tokenizer import TokenCounter
from models.types import ServedVersion, VersionKey
from serving.routing.kv_index import KvIndex
from serving.routing.router import Unmatched

JSON = dict[str, Any]


@dataclass(eq=False)
class PromptKey:
    """A prompt's token ids and, per block size, its full blocks' hashes."""

    tokens: list[int]
    hasher: BlockHasher
    lora: tuple[str, str] | None = None  # the adapter's name and path, as the engine loaded it
    salt: str | None = None  # the request's cache_salt
    _hashes: dict[int, list[int]] = field(default_factory=dict)

    def hashes(self, block_size: int) -> list[int]:
        found = self._hashes.get(block_size)
        if found is None:
            found = self._hashes[block_size] = self.hasher.hashes(
                self.tokens, block_size, lora=self.lora, salt=self.salt
            )
        return found


EndpointSource = Callable[[Replica], EventEndpoints | None]


def prompt_tokens(counter: TokenCounter, body: JSON) -> list[int] | None:
    """The token ids the engine will give ``body``'s prompt (chat or one completion
    prompt), or None when it has none we can tell."""
    messages = body.get("messages")
    if isinstance(messages, list):
        try:
            text = counter.render_chat(messages, body.get("tools") or None)
        except Exception:  # a template that refuses these messages: no prefix to route by
            return None
        special = False
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return None
        text, special = prompt, True
    ids: list[int] = counter.tokenizer.encode_batch([text], add_special_tokens=special)[0].ids
    return ids


@dataclass
class KvMetrics:
    decisions: Counter
    predicted: Counter
    prompt: Counter
    blocks: Gauge
    rebuilds: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None) -> KvMetrics:
        reg = registry or CollectorRegistry()
        return cls(
            decisions=Counter(
                "weir_kv_route_decisions",
                "KV-aware routing decisions by reason"
                " (cache_hit|no_hit|busy|no_prefix|no_events|adapter_unknown)",
                ["model", "reason"], registry=reg,
            ),
            predicted=Counter(
                "weir_kv_predicted_hit_tokens",
                "Prompt tokens the chosen replica holds, by the index", ["model"], registry=reg,
            ),
            prompt=Counter(
                "weir_kv_routed_prompt_tokens", "Prompt tokens of KV-routed requests", ["model"],
                registry=reg,
            ),
            blocks=Gauge(
                "weir_kv_index_blocks", "KV blocks the index says a replica holds", ["replica"],
                registry=reg, multiprocess_mode="max",
            ),
            rebuilds=Counter(
                "weir_kv_index_rebuilds",
                "Times a replica's block index was emptied and rebuilt, by why",
                ["replica", "why"], registry=reg,
            ),
        )  # fmt: skip


class KvRouting:
    """The KV event index and prompt keys of the gateway's ``kv_aware`` models."""

    def __init__(
        self,
        models: list[ModelConfig],
        counters: Mapping[VersionKey, TokenCounter],  # the proxy's: deploys add to it
        *,
        host: str = "cpu",  # engines.host: auto, cpu or cuda
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.models: dict[str, ModelConfig] = {}
        self.versions: dict[VersionKey, VersionConfig] = {}
        for model in models:
            self.configure(model)
        self.counters = counters
        self.sources: list[EndpointSource] = []  # asked first (the fleet board)
        self.host = vllm_engine.host_kind(host)
        self.metrics = KvMetrics.create(registry)
        self.index = KvIndex(
            self._endpoints, self._max_blocks, on_rebuild=self._rebuilt, on_tick=self.observe
        )

    def __repr__(self) -> str:
        return f"KvRouting(models={list(self.models)!r})"

    def configure(self, model: ModelConfig) -> None:
        """Follow ``model`` if it routes ``kv_aware``, with every version it has had (a
        deployed version's engine flags give its block size and hash)."""
        if not kv_events.wanted(model):
            return
        self.models[model.name] = model
        for version in model.versions:
            self.versions[VersionKey(model.name, version.version)] = version

    def _endpoints(self, replica: Replica) -> EventEndpoints | None:
        if replica.key.model not in self.models:
            return None
        for source in self.sources:
            found = source(replica)
            if found is not None:
                return found
        if replica.process is not None:
            return kv_events.local_endpoints(replica.key)
        url = getattr(replica.engine, "base_url", None)
        version = self.versions.get(replica.key.version_key)
        if version is None or not isinstance(url, str):
            return None
        return kv_events.remote_endpoints(version, url, replica.key.index)

    def _max_blocks(self, replica: Replica) -> int:
        model = self.models.get(replica.key.model)
        return model.routing.kv_max_blocks if model is not None else 1

    def _rebuilt(self, replica: Replica, why: str) -> None:
        self.metrics.rebuilds.labels(str(replica.key), why).inc()

    def settings(self, key: VersionKey) -> HashSettings | None:
        if key.model not in self.models:
            return None
        version = self.versions.get(key)
        return None if version is None else HashSettings.of(version, self.host)

    async def prompt_key(
        self, served: ServedVersion, body: JSON, lora_path: str | None = None
    ) -> PromptKey | Unmatched | None:
        """``body``'s prompt key (tokenized off the event loop), or None; ``lora_path``:
        where the engines loaded ``served``'s adapter from (None: not known)."""
        lora = None
        if served.adapter is not None:
            if lora_path is None:
                return Unmatched("adapter_unknown")  # its blocks hash with the path
            lora = (served.adapter, lora_path)
        salt = body.get("cache_salt")
        if salt is not None and not (isinstance(salt, str) and salt):
            return None  # the engine refuses it
        counter = self.counters.get(served.engine)
        settings = self.settings(served.engine)
        if counter is None or settings is None:
            return None
        tokens = await asyncio.to_thread(prompt_tokens, counter, body)
        if not tokens:
            return None
        return PromptKey(tokens, settings.hasher(), lora, salt)

    def default_block_size(self, key: VersionKey) -> int:
        settings = self.settings(key)
        return settings.block_size if settings is not None else 16

    def observe(self) -> None:
        """Sets the index gauges (every second while following)."""
        for replica, blocks in self.index.followed().items():
            self.metrics.blocks.labels(str(replica.key)).set(len(blocks.blocks))

    def start(self, fleet: Fleet) -> None:
        if self.models:
            self.index.start(fleet)

    async def stop(self) -> None:
        await self.index.stop()
