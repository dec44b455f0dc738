"""The root settings: one ``weir.toml`` plus ``WEIR_*`` environment overrides.

Nested configs are plain models owned by each package (``models.config`` for the store,
engines and served models). Built once in ``serving.cli`` and passed down; there is no
module-level instance. Environment beats the file: ``WEIR_GATEWAY__PORT=9000``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from models.config import EngineConfig, ModelConfig, StoreConfig, default_models
from serving.billing.config import BillingConfig
from serving.ledger.config import LedgerConfig


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[SecretStr] = []  # static bearer keys; none means loopback only
    allow_unauthenticated: bool = False  # required to bind beyond loopback without keys
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # 413 above this
    # Before any key is checked (serving.http.connection_guard): a request's head over this
    # is a 431; a head not received within header_timeout_s (from its first byte, or from
    # the connection's opening) or a body within body_timeout_s is a 408; one client
    # address over max_connections_per_client open connections is refused (429; 0: no cap;
    # raise it behind a proxy that sends every client from one address)
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections_per_client: int = Field(1024, ge=0)
    # free heap pages are handed back to the system this often (serving.memory)
    memory_trim_interval_s: float = Field(10.0, gt=0)
    engine_connect_timeout_s: float = Field(5.0, gt=0)
    engine_idle_timeout_s: float = Field(120.0, gt=0)  # any read: headers, the next chunk
    engine_ttft_timeout_s: float = Field(120.0, gt=0)  # a stream's first chunk
    engine_total_timeout_s: float = Field(600.0, gt=0)  # a whole request, streamed or not
    # an idle pooled engine connection is closed after this, below the engines' own
    # keep-alive (5 s for vLLM) so that no request goes out on one they are closing
    engine_keepalive_s: float = Field(4.0, gt=0)
    # the longest a stream waits for its client to take the next event (a client that stops
    # reading would hold its engine slot); past it the stream is closed as if the client left
    client_send_timeout_s: float = Field(30.0, gt=0)
    # aiohttp pool (health checks, warm-ups); requests use one keep-alive pool per engine
    # (models.engines.h1, up to 1000 connections each)
    max_connections: int = Field(1000, ge=1)
    ready_timeout_s: float = Field(900.0, gt=0)  # `weir serve` gives up waiting after this

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class KeysConfig(BaseModel):
    """API keys from a store: Redis (shared by gateways) when ``redis_url`` is set, else a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False  # every /v1 and /weir request needs a key from the store
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0 (run it with noeviction)
    file: Path = Path("~/.config/weir/keys.json")  # the store without Redis; one process only
    admin_key: SecretStr | None = None  # Bearer key for /weir/admin/*; unset: admin API off
    timeout_s: float = Field(0.5, gt=0)  # Redis connect and read timeout
    cache_ttl_s: float = Field(5.0, ge=0)  # reuse a looked-up key this long (0: every time);
    # a revocation reaches the other gateways within it
    # Redis down: >0 serves keys confirmed this recently (a revocation made elsewhere may be
    # missed); 0: a stored key gets 503 auth_unavailable until Redis is back
    stale_s: float = Field(0.0, ge=0)


class LimitsConfig(BaseModel):
    """Rate limits and token quotas. Per-key limits live on the keys; these are the store,
    the Redis-down policy and the per-model token budgets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    store: Literal["auto", "memory", "redis"] = "auto"  # auto: Redis when a URL is known
    redis_url: str | None = None  # default: keys.redis_url; none: in-process (one process)
    on_redis_down: Literal["closed", "open"] = "closed"  # 503, or admit against local counters
    timeout_s: float = Field(0.5, gt=0)  # Redis connect, read and pool wait on the hot path
    retry_s: float = Field(1.0, gt=0)  # after a Redis failure, skip it for this long
    lease_s: float = Field(900.0, gt=0)  # a reservation not settled by then is dropped
    model_tpm: dict[str, int] = {}  # model -> tokens per minute (runtime: weir limits set)

    def store_url(self, keys: KeysConfig) -> str | None:
        """The Redis the limits live in; None means the in-process store."""
        if self.store == "memory":
            return None
        url = self.redis_url or keys.redis_url
        if self.store == "redis" and url is None:
            raise ValueError(
                "limits.store is redis but neither limits.redis_url nor keys.redis_url is set"
            )
        return url


class CacheConfig(BaseModel):
    """The response and embedding caches. Deterministic requests only, scoped per tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    redis_url: str | None = None  # its own Redis (allkeys-lru); none: in-process LRU
    timeout_s: float = Field(0.1, gt=0)  # the longest a request waits on the cache
    ttl_s: int = Field(3600, ge=1)
    max_entry_bytes: int = Field(256 * 1024, ge=1024)  # larger answers are not stored
    memory_max_bytes: int = Field(64 * 2**20, ge=2**20)  # the in-process store's bound
    charge_hits: bool = False  # a hit charges its tokens to the key's token limits
    embeddings: bool = True  # cache embeddings per (version, text)


class ResponsesConfig(BaseModel):
    """The Responses API's stored responses: Redis (shared by gateways) or a SQLite file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True  # POST/GET/DELETE /v1/responses
    redis_url: str | None = None  # default: keys.redis_url; none: the SQLite file
    sqlite_path: Path = Path("~/.cache/weir/responses.sqlite3")  # one host's gateways
    timeout_s: float = Field(0.5, gt=0)  # Redis connect and read timeout
    ttl_s: int = Field(30 * 24 * 3600, ge=1)  # a stored response is kept this long
    max_input_items: int = Field(256, ge=1, le=2048)  # items in one request's input
    max_chain_items: int = Field(1024, ge=1)  # items of a conversation (previous_response_id)
    max_chain_bytes: int = Field(4 * 2**20, ge=1024)  # a stored conversation's size
    # What one tenant may keep stored (every gateway's responses counted in the store, as it
    # writes one): past either, its oldest responses are evicted to make room (the newest is
    # always kept; continuing an evicted one is a 404)
    max_tenant_records: int = Field(10_000, ge=1)
    max_tenant_bytes: int = Field(256 * 2**20, ge=1024)

    def store_url(self, keys: KeysConfig) -> str | None:
        return self.redis_url or keys.redis_url


class BatchesConfig(BaseModel):
    """The OpenAI Batch API (``/v1/files``, ``/v1/batches``): files and batch state in one
    SQLite file, or PostgreSQL; a batch's requests run through the gateway at batch priority."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    sqlite_path: Path = Path("~/.cache/weir/batches.sqlite3")  # one host's gateways share it
    # PostgreSQL (postgresql://...) shared by every gateway, files' bytes included; unset:
    # the SQLite file above
    database_url: SecretStr | None = None
    max_file_bytes: int = Field(50 * 2**20, ge=1024)  # an uploaded file (its own body limit)
    max_requests: int = Field(50_000, ge=1)  # lines of one batch's input file
    concurrency: int = Field(64, ge=1)  # batch requests one gateway has in the works at once
    lease_s: float = Field(10.0, gt=0)  # a running batch is another gateway's after this
    poll_s: float = Field(1.0, gt=0)  # how often a gateway looks for batches to run
    retry_max_s: float = Field(30.0, gt=0)  # back-off cap for a request refused 429/503
    # an upload without expires_after expires this long after it (OpenAI's 30 days); 0: kept
    upload_expires_s: int = Field(30 * 86_400, ge=0)
    sweep_s: float = Field(60.0, gt=0, le=3600)  # expired files' bytes removed this often
    # What one tenant may keep stored, counted in the store as each file is written: its
    # files (uploads and batch output) and the input lines of its running batches. An
    # upload or batch past either is a 400 (storage_quota_exceeded), nothing stored; a
    # batch's output files are always written (the tenant may go over by them).
    max_tenant_bytes: int = Field(10 * 2**30, ge=1024)
    max_tenant_files: int = Field(1_000, ge=1)

    @model_validator(mode="after")
    def _postgres_only(self) -> BatchesConfig:
        url = self.database_url
        if url is not None and not url.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("batches.database_url must be a postgresql:// URL")
        return self


MIN_WORKER_TOKEN = 16  # characters of retrieval.worker_token


class RetrievalConfig(BaseModel):
    """Collections, search and RAG. The docstore and indexes live under ``path``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    path: Path = Path("~/.local/share/weir/retrieval")  # opened on first use
    # The docstore in PostgreSQL (postgresql://...), shared by every gateway and index
    # worker; unset: SQLite under ``path`` (one process). Index snapshots stay under path.
    database_url: SecretStr | None = None
    # Each gateway's indexes follow the docstore's log: woken by PostgreSQL's NOTIFY, and
    # every this many seconds in any case (SQLite shared by --workers: polling only).
    follow_interval_s: float = Field(0.25, gt=0, le=60)
    # concurrent searches of a collection go to FAISS as one batch: at most max_batch
    # queries, the first waiting at most batch_window_ms for others
    batch_window_ms: float = Field(1.0, ge=0, le=50)
    max_batch: int = Field(64, ge=1, le=1024)
    # Shards: a new collection is split into this many by document id (POST
    # /v1/collections may say otherwise). With index_workers (PostgreSQL only) gateways
    # hold no index: `weir retrieval serve` workers hold the shards (placed by leases of
    # worker_lease_s in the database) and gateways scatter each search to their owners,
    # a shard's search given worker_timeout_s, and up to takeover_s for a dead worker's
    # shards to be taken over before the search fails (503).
    shards: int = Field(1, ge=1, le=256)
    index_workers: bool = False
    worker_lease_s: float = Field(5.0, gt=0, le=300)
    worker_timeout_s: float = Field(2.0, gt=0)
    takeover_s: float = Field(15.0, gt=0)
    # The shared secret between gateways and index workers: gateways send it as a bearer
    # token with each scattered search, workers compare it in constant time and answer
    # anything without it 401. The same value on both (WEIR_RETRIEVAL__WORKER_TOKEN);
    # unset: a worker answers whoever reaches its port, and says so in a warning at start.
    worker_token: SecretStr | None = Field(None, min_length=MIN_WORKER_TOKEN)
    embedding_model: str = "minilm"
    chunk_tokens: int = Field(256, ge=16)
    chunk_overlap: int = Field(32, ge=0)
    index: Literal["flat", "ivf", "hnsw"] = "flat"  # ivf/hnsw for large collections
    # strong: a write is acknowledged after this gateway's index has it, and a search
    # first catches up to the docstore's head (what any gateway acknowledged is found);
    # eventual: searches see other gateways' writes within the follower's lag
    consistency: Literal["strong", "eventual"] = "strong"
    snapshot_every: int = Field(1000, ge=1)  # index snapshot every N writes (and on stop)
    timeout_s: float = Field(2.0, gt=0)  # RAG: longer than this and the answer is degraded
    max_top_k: int = Field(50, ge=1)
    max_documents: int = Field(256, ge=1)  # per request
    max_document_bytes: int = Field(1_000_000, ge=1)

    @model_validator(mode="after")
    def _workers_share_a_database(self) -> RetrievalConfig:
        if self.index_workers and self.database_url is None:
            raise ValueError("retrieval.index_workers needs retrieval.database_url (PostgreSQL)")
        return self


class ObservabilityConfig(BaseModel):
    """Metrics, the per-request log line and its format. Tracing follows ``OTEL_*``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: bool = True  # GET /metrics
    access_log: bool = True  # one line per request (ids, sizes, times; never content)
    log_format: Literal["text", "json"] = "text"


class ContractConfig(BaseModel):
    """The request contract's configured maxima and policies (hard caps live in protocol)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strict_fields: bool = False  # reject unknown request fields (400) instead of logging them
    max_n: int = Field(8, ge=1, le=16)
    max_tokens: int = Field(8192, ge=1)  # largest max_tokens a client may ask for
    max_messages: int = Field(256, ge=1, le=2048)
    max_embedding_inputs: int = Field(256, ge=1, le=2048)
    invalid_output: Literal["reject", "pass"] = "reject"  # schema-breaking JSON: 502 or header
    # Hosts an image part's http(s) URL may name: a multimodal engine fetches it from its
    # own network. None: only data: URLs (the image in the request) reach the engine.
    image_url_hosts: tuple[str, ...] = ()


class DeployConfig(BaseModel):
    """Runtime version rollouts (``weir deploy``, ``weir rollback``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_timeout_s: float | None = Field(None, gt=0)  # new engines healthy; None: engines'
    warm_requests: int = Field(2, ge=0, le=64)  # per new replica, before it takes traffic
    warm_timeout_s: float = Field(60.0, gt=0)  # per warm request
    drain_timeout_s: float = Field(300.0, gt=0)  # old version's requests finish, then stop
    min_canary_requests: int = Field(20, ge=1)  # fewer in the window: the gate rolls back
    state_file: Path | None = None  # where rollouts are recorded; a restart resumes them
    # Fleet-wide rollouts: the state in Redis (serving/rollout/shared.py), followed by every
    # gateway process and `weir engines`; one deploy per model at a time across them.
    redis_url: str | None = None  # or keys.redis_url when shared = true; none: per process
    shared: bool = False
    follow_interval_s: float = Field(0.1, gt=0, le=1)  # how often each process polls its seq
    lease_s: float = Field(30.0, gt=0)  # a model's rollout lease (renewed every third)
    redis_timeout_s: float = Field(2.0, gt=0)
    switch_timeout_s: float = Field(60.0, gt=0)  # a follower waits this for new replicas


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WEIR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # a config error never echoes keys, headers or passwords
    )

    gateway: GatewayConfig = GatewayConfig()
    contract: ContractConfig = ContractConfig()
    keys: KeysConfig = KeysConfig()
    limits: LimitsConfig = LimitsConfig()
    billing: BillingConfig = BillingConfig()  # prices and team budgets
    ledger: LedgerConfig = LedgerConfig()  # one usage row per request, in SQL
    observability: ObservabilityConfig = ObservabilityConfig()
    cache: CacheConfig = CacheConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    responses: ResponsesConfig = ResponsesConfig()
    batches: BatchesConfig = BatchesConfig()
    deploy: DeployConfig = DeployConfig()
    store: StoreConfig = StoreConfig()
    engines: EngineConfig = EngineConfig()
    models: list[ModelConfig] = Field(default_factory=default_models)

    @model_validator(mode="after")
    def _limits_have_their_store(self) -> Settings:
        if self.limits.store == "redis" and self.limits.store_url(self.keys) is None:
            raise ValueError("limits.store is redis, but no limits.redis_url or keys.redis_url")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls)
        return (init_settings, env_settings, dotenv_settings, toml, file_secret_settings)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config`` (a TOML file) under environment overrides and ``overrides``."""
    if config is None:
        return Settings(**overrides)
    if not config.is_file():
        raise FileNotFoundError(f"config file {config} does not exist")
    from_file = type(
        "FileSettings",
        (Settings,),
        {"model_config": {**Settings.model_config, "toml_file": config}},
    )
    settings: Settings = from_file(**overrides)
    return settings
