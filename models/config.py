"""Configuration owned by ``models``: the store, the engines and the served models.

Plain pydantic models; ``serving.settings`` composes them into the one root settings
object, read from ``weir.toml`` plus ``WEIR_*`` environment overrides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from models.engines.h1 import fixed_headers
from models.errors import ConfigError

KV_HASH_FLAG = "--prefix-caching-hash-algo"
KV_HASHES = ("sha256", "sha256_cbor")  # the block hashes a gateway can recompute
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_STORE = Path("~/.cache/weir/models")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Strict):
    """Where pulled and converted weights live (outside the repo)."""

    path: Path = DEFAULT_STORE
    verify_on_start: bool = True  # sha256 of every weight file before an engine loads it

    @property
    def root(self) -> Path:
        return self.path.expanduser()


class EngineConfig(_Strict):
    """How local engine processes are run and watched."""

    log_dir: Path = Path("~/.cache/weir/logs")
    start_timeout_s: float = Field(600.0, gt=0)  # longest wait for a fresh engine's /health
    stop_grace_s: float = Field(10.0, gt=0)  # SIGTERM, then SIGKILL after this
    health_interval_s: float = Field(2.0, gt=0)
    health_timeout_s: float = Field(2.0, gt=0)
    unhealthy_after: int = Field(3, ge=1)  # failed checks in a row before leaving rotation
    restart_backoff_base_s: float = Field(1.0, gt=0)
    restart_backoff_cap_s: float = Field(30.0, gt=0)
    # Engine flags by host kind; a version's own engine_args come after these.
    cpu_args: list[str] = ["--enforce-eager", "--dtype", "bfloat16"]
    cuda_args: list[str] = []
    cpu_env: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    # GPU placement: each engine needs its weights (per TP rank) + this KV cache budget +
    # about 1.5 GiB of CUDA overhead; engines on one GPU take at most gpu_memory_cap of it
    gpu_kv_cache_gib: float = Field(2.0, gt=0)
    gpu_memory_cap: float = Field(0.9, gt=0, le=1)
    # Which engine flags apply: auto = cuda where an NVIDIA device is visible, else cpu.
    # Env: WEIR_ENGINES__HOST=cuda (the CUDA image sets it).
    host: Literal["auto", "cpu", "cuda"] = "auto"
    # Engines apart from the gateway (`weir engines`, `weir serve --workers N`): the file
    # where the supervisor publishes the local engines; a gateway given one starts no
    # engine and follows it (env WEIR_ENGINES__BOARD; `weir serve --workers` sets it).
    board: Path | None = None
    retire_after_s: float = Field(30.0, ge=0)  # a version off the board: engines stop then
    server: str = "vllm.entrypoints.openai.api_server"  # python -m this (tests: a fake)


class VersionConfig(_Strict):
    """One version of a model: its weights (or a remote engine) and how to run it."""

    # a config error never echoes the input: it may hold header secrets or a URL password
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    version: str
    weights: str | None = None  # a store entry name or a local directory
    url: str | None = None  # a remote engine we do not start, e.g. http://vllm:8000
    urls: list[str] = []  # several remote replicas of this version, one URL each
    # remote replicas found in DNS: "host:port" of a Kubernetes headless Service, whose A
    # records (one per ready engine pod) are re-read every dns_refresh_s
    dns: str | None = None
    dns_refresh_s: float = Field(10.0, gt=0)
    served_name: str | None = None  # the engine's model name (default: the public name)
    tokenizer: str | None = None  # for a remote engine: a store entry or directory to count with
    # a remote engine's KV event sockets (kv_aware routing): its URL's host at these ports
    # (vLLM's --kv-events-config endpoint tcp://*:PORT, replay_endpoint tcp://*:PORT)
    kv_events_port: int | None = Field(None, ge=1, le=65535)
    kv_replay_port: int | None = Field(None, ge=1, le=65535)
    # or each of urls' engines its own: "tcp://HOST:PORT" or "tcp://HOST:PORT tcp://HOST:REPLAY"
    kv_events: list[str] = []
    replicas: int = Field(1, ge=1, le=64)
    engine_args: list[str] = []
    env: dict[str, str] = {}
    # CPU hosts: the cores this version's local engines run on (processes pinned, vLLM's
    # OpenMP threads bound there); empty: the planner gives each engine its own share
    cpus: list[Annotated[int, Field(ge=0)]] = []
    # GPU hosts: the GPUs its replicas use (replica i: the i-th run of its TP size);
    # empty: the planner picks free ones (models/engines/placement)
    gpus: list[Annotated[int, Field(ge=0)]] = []
    standby: bool = False  # configured but not started: `weir deploy` starts it
    # sent with every request to this version's engines (inference and health), e.g.
    # { Authorization = "Bearer ..." } for vLLM's --api-key or an ingress; never logged or
    # shown. A URL's user:password@ is sent as Basic auth instead (not both).
    headers: dict[str, SecretStr] = {}
    # Tool calling (chat): "auto" derives vLLM's tool-call parser from the chat template;
    # "off" refuses requests with tools; else a parser name (--tool-call-parser).
    tool_parser: str = Field("auto", pattern=r"^[a-z0-9_]+$")
    chat_template: str | None = None  # a Jinja file the engine renders chats with
    # how strictly vLLM holds tool calls to their schemas: "parameter" (every call's
    # arguments match its tool's parameters), "function", or "auto" (per tool's strict)
    tool_strict: Literal["auto", "function", "parameter"] = "parameter"
    # LoRA (models/adapters): engines start with LoRA on when the version lists adapters
    # (store names, served as MODEL:ADAPTER) or sets lora; adapters whose base is this
    # version in the adapter store are served too, and `weir adapters add` loads new ones
    # into running engines
    adapters: list[str] = []
    lora: bool = False
    max_loras: int = Field(4, ge=1, le=256)  # adapters an engine holds; LRU unloaded beyond
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    # A version served by another model's engines: base = "MODEL@VERSION" (a LoRA version)
    # with adapter = a stored adapter of it (none: the base model itself). Its model is an
    # alias (e.g. support-bot) whose versions deploy, canary and roll back as any other.
    base: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+$")
    adapter: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,47}$")

    @property
    def lora_enabled(self) -> bool:
        return self.lora or bool(self.adapters)

    @field_validator("version")
    @classmethod
    def _version_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"version '{value}' must match {_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> VersionConfig:
        given = [
            self.weights is not None,
            self.url is not None,
            bool(self.urls),
            self.dns is not None,
            self.base is not None,
        ]
        if sum(given) != 1:
            raise ValueError(
                f"version '{self.version}': give exactly one of weights, url, urls, dns or base"
            )
        if self.adapter is not None and self.base is None:
            raise ValueError(f"version '{self.version}': adapter needs base = \"MODEL@VERSION\"")
        if self.dns is not None:
            host, _, port = self.dns.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"version '{self.version}': dns must be host:port, not {self.dns}")
        for url in self.urls or [self.url or "http://engine"]:
            try:
                fixed_headers(url, self.plain_headers)
            except ValueError as exc:
                raise ValueError(f"version '{self.version}': {exc}") from None
        return self

    @property
    def plain_headers(self) -> dict[str, str]:
        """``headers`` with their values revealed, for the engine client only."""
        return {name: value.get_secret_value() for name, value in self.headers.items()}

    @property
    def remote(self) -> list[str]:
        """The remote engines' URLs (one per replica); empty for local weights."""
        if self.urls:
            return list(self.urls)
        return [self.url] * self.replicas if self.url is not None else []

    @property
    def replica_count(self) -> int:
        """Replicas made at start (DNS-discovered ones come and go at runtime)."""
        if self.dns is not None or self.base is not None:
            return 0
        return len(self.urls) if self.urls else self.replicas


class TimeoutConfig(_Strict):
    """Per-model engine timeouts; unset ones take the gateway's ``engine_*_timeout_s``."""

    connect_s: float | None = Field(None, gt=0)  # TCP connect to a replica
    ttft_s: float | None = Field(None, gt=0)  # a stream's first chunk
    idle_s: float | None = Field(None, gt=0)  # between two chunks (or any read)
    total_s: float | None = Field(None, gt=0)  # a whole request, streamed or not


class RoutingConfig(_Strict):
    """How requests reach a version's replicas: bulkhead, breakers, retries, affinity."""

    max_in_flight: int = Field(64, ge=1)  # per version, across its replicas
    max_queue: int = Field(128, ge=0)  # waiting for a slot; beyond: 503 engine_overloaded
    queue_timeout_s: float = Field(5.0, gt=0)  # the longest wait for a slot
    prefix_affinity: bool = False  # same long prompt prefix -> same replica (prefix cache)
    affinity_prefix_chars: int = Field(512, ge=16)  # how much of the prompt is the prefix
    affinity_slack: int = Field(4, ge=0)  # leave the affine replica when this much busier
    # Which replica gets a request (serving/routing/router.py): "least_outstanding" (no
    # shared prompts), "prefix_hash" (the first affinity_prefix_chars pick a replica, as
    # prefix_affinity = true did), "kv_aware" (the replica holding the longest prefix of
    # the prompt's KV blocks, from the engines' KV events, against its load)
    strategy: Literal["least_outstanding", "prefix_hash", "kv_aware"] = "least_outstanding"
    kv_tokens_per_request: int = Field(256, ge=0)  # cached tokens worth one more in flight
    kv_max_blocks: int = Field(131072, ge=1)  # blocks remembered per replica (oldest go)
    breaker_failures: int = Field(5, ge=1)  # consecutive engine faults that open a breaker
    breaker_open_s: float = Field(10.0, gt=0)  # open this long, then half-open
    breaker_probes: int = Field(1, ge=1)  # requests let through while half-open
    retries: int = Field(2, ge=0)  # further attempts after an engine fault, before any byte
    retry_budget: float = Field(0.1, ge=0, le=1)  # retries at most this share of requests
    retry_budget_window_s: float = Field(10.0, gt=0)
    retry_budget_floor: int = Field(10, ge=0)  # retries always allowed per window
    backoff_base_s: float = Field(0.02, ge=0)  # full jitter: uniform(0, base * 2**(n-1))
    backoff_cap_s: float = Field(1.0, ge=0)
    # fair queueing (serving/routing/bulkhead.py): tenants (a key, or a key's team) share
    # the version's slots by weight, interactive before batch; false: one FCFS line
    fair_queueing: bool = True
    max_tenant_queue: int = Field(0, ge=0)  # one tenant's waiting requests; 0: max_queue
    fair_window_s: float = Field(5.0, gt=0)  # a tenant's demand is remembered this long
    # the in-flight limit follows the engine's measured time to first token, between
    # min_in_flight and max_in_flight (the engine's own line is FCFS: keep it short)
    adaptive_in_flight: bool = False
    min_in_flight: int = Field(1, ge=1)
    ttft_tolerance: float = Field(1.5, gt=1)  # TTFT past this times the recent best: too many


class ModelConfig(_Strict):
    """A public model name, its versions and the version its alias points at."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    task: Literal["chat", "embed"]
    current: str
    versions: list[VersionConfig] = Field(min_length=1)
    split: dict[str, float] = {}  # version -> weight for the alias; empty: all to ``current``
    sticky: Literal["none", "key", "conversation"] = "none"  # keep a caller on one version
    fallbacks: list[str] = []  # names tried in order when every replica is open or overloaded
    routing: RoutingConfig = RoutingConfig()
    timeouts: TimeoutConfig = TimeoutConfig()

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"model name '{value}' must match {_NAME.pattern}")
        return value

    @model_validator(mode="after")
    def _kv_hashes_reproducible(self) -> ModelConfig:
        """kv_aware routing recomputes the engines' block hashes: xxhash seeds each engine
        at random, so it is refused when the configuration loads, not on every request."""
        if self.routing.strategy != "kv_aware":
            return self
        for version in self.versions:
            args = version.engine_args
            for i, arg in enumerate(args):
                algo = arg.partition("=")[2] if arg.startswith(KV_HASH_FLAG + "=") else None
                if arg == KV_HASH_FLAG and i + 1 < len(args):
                    algo = args[i + 1]
                if algo is not None and algo not in KV_HASHES:
                    raise ValueError(
                        f"model '{self.name}' version '{version.version}': routing.strategy"
                        f" kv_aware needs {KV_HASH_FLAG} {' or '.join(KV_HASHES)}, not {algo}"
                        " (xxhash seeds each engine at random)"
                    )
        return self

    @model_validator(mode="after")
    def _current_exists(self) -> ModelConfig:
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"model '{self.name}': duplicate versions {names}")
        if self.current not in names:
            raise ValueError(f"model '{self.name}': current '{self.current}' not in {names}")
        for version, weight in self.split.items():
            if version not in names:
                raise ValueError(f"model '{self.name}': split names unknown version '{version}'")
            if weight < 0:
                raise ValueError(f"model '{self.name}': split weight for '{version}' is negative")
        if self.split and sum(self.split.values()) <= 0:
            raise ValueError(f"model '{self.name}': split weights add up to nothing")
        return self

    def shares(self) -> dict[str, float]:
        """Each version's share of the alias's traffic (sums to 1)."""
        if not self.split:
            return {self.current: 1.0}
        total = sum(self.split.values())
        return {v: w / total for v, w in self.split.items() if w > 0}

    def running(self) -> list[str]:
        """The versions started with the gateway: current, the split's, and not standby."""
        wanted = {self.current, *self.split}
        return [v.version for v in self.versions if v.version in wanted or not v.standby]

    def version(self, version: str) -> VersionConfig:
        for candidate in self.versions:
            if candidate.version == version:
                return candidate
        raise ConfigError(f"model '{self.name}' has no version '{version}'")


def default_models() -> list[ModelConfig]:
    """What ``weir serve`` serves with no config file: a chat and an embedding model."""
    return [
        ModelConfig(
            name="smollm2",
            task="chat",
            current="135m-instruct",
            versions=[
                VersionConfig(
                    version="135m-instruct",
                    weights="smollm2-135m-instruct",
                    engine_args=["--max-model-len", "2048"],
                )
            ],
        ),
        ModelConfig(
            name="minilm",
            task="embed",
            current="l6-v2",
            versions=[VersionConfig(version="l6-v2", weights="all-minilm-l6-v2")],
        ),
    ]
