"""``create_app(settings)``: the gateway application, one path per route, and its lifespan.

The application is ``Front`` over one Starlette ``Router``: the model routes first
(``serving.http.model_routes``: no dependency injection, body read once), then a ``Mount``
of the FastAPI application for the admin, collections, catalog, health and docs routes.
Its OpenAPI document lists the model routes too, from the same table.

The lifespan opens the one pooled engine session, starts the fleet (local engines are
started, remote ones health-checked) and stops every engine on shutdown. The port is
served at once: ``/healthz`` answers while engines load, ``/readyz`` says when they are up.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from opentelemetry.sdk.trace import TracerProvider
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Mount, Router
from starlette.types import Receive, Scope, Send

from models.adapters.store import AdapterStore
from models.engines.client import EngineTimeouts, json_dumps
from models.engines.discovery import DnsDiscovery
from models.engines.fleet import Fleet
from models.engines.launcher import ReplicaFactory, build_fleet, check_weights, load_counters
from models.errors import WeirModelError
from models.registry import Registry
from models.tokenizer import TokenCounter
from models.types import VersionKey
from retrieval.errors import RetrievalError
from serving import workers
from serving.adapters.setup import ControlFactory, make_adapters
from serving.batches.runner import KeyLookup
from serving.batches.service import make_batches
from serving.billing.setup import make_meter
from serving.cache.service import Cache
from serving.cache.store import CacheStore, MemoryCacheStore, RedisCacheStore
from serving.core.proxy import Proxy
from serving.core.rag import RetrievalGate
from serving.errors import (
    GatewayError,
)
from serving.http import model_routes, responses_routes
from serving.http.front import Front, Keys, request_id_of
from serving.http.rendering import as_ours, error_response
from serving.http.routes import (
    adapters,
    admin,
    admin_limits,
    admin_usage,
    catalog,
    collections,
    deploy,
    engines,
    health,
    metrics_route,
)
from serving.http.routes import (
    batches as batch_routes,
)
from serving.http.validation import invalid_request_from
from serving.keys.cache import CachedKeyStore
from serving.keys.records import KeyRecord
from serving.keys.store import KeyStore, make_key_store
from serving.limits.limiter import Limiter
from serving.limits.redis_store import make_limit_store
from serving.observe.metrics import Metrics
from serving.observe.tracing import make_provider, tracer_from
from serving.responses.service import make_responses
from serving.rollout import shared as rollout_shared
from serving.rollout.deployer import Deployer, ReplicaMaker
from serving.rollout.state import RolloutState
from serving.routing.dispatch import Deadlines, Dispatcher
from serving.routing.kv_routing import KvRouting
from serving.settings import Settings

log = logging.getLogger("weir.gateway")
FleetFactory = Callable[[aiohttp.ClientSession], Fleet]
DiscoveryFactory = Callable[[Fleet, aiohttp.ClientSession], DnsDiscovery]
ReplicasFactory = Callable[[aiohttp.ClientSession], ReplicaMaker]
OnReady = Callable[[], None]


async def _rendered(request: Request, exc: Exception) -> Response:
    """The FastAPI routes' errors, through the one table (as ``Front`` renders the rest)."""
    error: Exception = exc
    if isinstance(exc, RequestValidationError):
        error = invalid_request_from(exc)
    elif isinstance(exc, StarletteHTTPException):
        error = as_ours(exc, request.scope)
    return error_response(error, request_id_of(request.scope))


class Gateway:
    """The ASGI application: ``Front`` over the router. ``state`` holds the services
    (the proxy, deployer, registry, stores) once the lifespan has made them."""

    def __init__(self, front: Front, router: Router, api: FastAPI) -> None:
        self.front = front
        self.router = router  # its lifespan_context starts and stops the services
        self.api = api

    def __repr__(self) -> str:
        return "Gateway()"

    @property
    def state(self) -> State:
        return self.api.state

    def openapi(self) -> dict[str, Any]:
        return self.api.openapi()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    fleet_factory: FleetFactory | None = None,
    weights: dict[VersionKey, Path] | None = None,
    counters: dict[VersionKey, TokenCounter] | None = None,
    on_ready: OnReady | None = None,
    tracer_provider: TracerProvider | None = None,
    replicas_factory: ReplicasFactory | None = None,
    discovery_factory: DiscoveryFactory | None = None,
    adapter_control: ControlFactory | None = None,
) -> Gateway:
    """The gateway. Tests pass ``fleet_factory`` (fake engines), ``replicas_factory`` (what
    a deploy starts) and ``counters``; the CLI passes the ``weights`` it already checked.
    Otherwise all come from ``settings``."""
    gateway = settings.gateway
    board = settings.engines.board if fleet_factory is None else None  # engines elsewhere
    state = RolloutState(settings.deploy.state_file) if settings.deploy.state_file else None
    if state is not None:
        settings = settings.model_copy(update={"models": state.apply(settings.models)})
    registry = Registry(settings.models)
    keys = settings.keys
    key_store: KeyStore | None = (
        make_key_store(keys.file, keys.redis_url, keys.timeout_s)
        if keys.enabled or keys.admin_key is not None
        else None
    )
    if key_store is not None and keys.redis_url and keys.cache_ttl_s > 0:
        key_store = CachedKeyStore(key_store, ttl_s=keys.cache_ttl_s, stale_s=keys.stale_s)
    limits = settings.limits
    observe = settings.observability
    provider = tracer_provider if tracer_provider is not None else make_provider()
    tracer = tracer_from(provider)
    metrics = Metrics.create() if observe.metrics else None
    cache = _make_cache(settings, metrics)
    meter = make_meter(settings.billing, settings.ledger, metrics.registry if metrics else None)

    def count_retry(model: str) -> None:
        if metrics is not None:
            metrics.retries.labels(model).inc()

    limiter = (
        Limiter(
            make_limit_store(limits.store_url(keys), limits.timeout_s),
            policy=limits.on_redis_down,
            lease_s=limits.lease_s,
            retry_s=limits.retry_s,
        )
        if limits.enabled
        else None
    )
    timeouts = EngineTimeouts(
        connect_s=gateway.engine_connect_timeout_s,
        idle_s=gateway.engine_idle_timeout_s,
        total_s=gateway.engine_total_timeout_s,
        health_s=settings.engines.health_timeout_s,
        keepalive_s=gateway.engine_keepalive_s,
    )

    def resolved_weights() -> dict[VersionKey, Path]:
        if weights is not None:
            return weights
        if fleet_factory is not None:
            return {}
        return check_weights(settings.models, settings.store)

    def replica_maker(session: aiohttp.ClientSession) -> ReplicaMaker:
        if replicas_factory is not None:
            return replicas_factory(session)
        return ReplicaFactory(settings.engines, timeouts)

    def make_discovery(fleet: Fleet, session: aiohttp.ClientSession) -> DnsDiscovery:
        if discovery_factory is not None:
            return discovery_factory(fleet, session)
        return DnsDiscovery(fleet, ReplicaFactory(settings.engines, timeouts).remote)

    def make_fleet(session: aiohttp.ClientSession, found: dict[VersionKey, Path]) -> Fleet:
        if fleet_factory is not None:
            return fleet_factory(session)
        factory = ReplicaFactory(settings.engines, timeouts)
        return build_fleet(workers.fleet_models(settings.models, board), found, factory)

    api = FastAPI(
        title="Weir gateway",
        version="0.1.0",
        exception_handlers={
            WeirModelError: _rendered,
            GatewayError: _rendered,
            RetrievalError: _rendered,
            RequestValidationError: _rendered,
            StarletteHTTPException: _rendered,
            Exception: _rendered,
        },
    )

    @asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        nonlocal settings
        shared, joined = await rollout_shared.join(settings, registry)  # mid-rollout too
        settings = settings.model_copy(update={"models": joined})
        connector = aiohttp.TCPConnector(limit=gateway.max_connections, limit_per_host=0)
        session = aiohttp.ClientSession(connector=connector, json_serialize=json_dumps)
        found = await asyncio.to_thread(resolved_weights)
        if counters is None:
            loaded = await asyncio.to_thread(load_counters, settings.models, found, settings.store)
        else:
            loaded = counters
        fleet = make_fleet(session, found)
        deadlines = Deadlines(gateway.engine_ttft_timeout_s, gateway.engine_total_timeout_s)
        kv = KvRouting(settings.models, loaded, host=settings.engines.host,
                       registry=metrics.registry if metrics else None)  # fmt: skip
        dispatcher = Dispatcher(
            fleet, settings.models, deadlines, tracer=tracer, on_retry=count_retry, kv=kv
        )
        api.state.proxy = Proxy(
            registry, dispatcher, loaded, settings.contract, limiter, limits.model_tpm,
            metrics=metrics, tracer=tracer, log_requests=observe.access_log,
            cache=cache, cache_embeddings=settings.cache.embeddings, meter=meter,
        )  # fmt: skip
        proxy: Proxy = api.state.proxy
        kv.counters = proxy.counters  # one map: a deployed version's counter serves routing too
        if metrics is not None:  # each version's line per priority and tenant
            dispatcher.observe_queues(
                lambda key, priority, tenant, n: metrics.child(
                    metrics.queue_depth, key.model, key.version, priority, tenant
                ).set(n)
            )
        lora = make_adapters(
            settings.models, AdapterStore(settings.store.root), registry, fleet, session,
            proxy.tracker, metrics.registry if metrics else None, adapter_control,
        )  # fmt: skip
        if lora is not None:
            await asyncio.to_thread(lora.check)  # configured adapters are in the store
            dispatcher.adapters = api.state.adapters = lora
        discovery = make_discovery(fleet, session)
        follower = (
            workers.follow_board(board, fleet, registry, dispatcher,
                                 ReplicaFactory(settings.engines, timeouts))
            if board is not None else None
        )  # fmt: skip
        for model in settings.models:
            for version in model.versions:
                if version.dns is not None and version.version in model.running():
                    discovery.track(model, version)
        api.state.deployer = Deployer(
            registry, fleet, dispatcher, proxy.counters, proxy.tracker, replica_maker(session),
            settings.store, settings.deploy, settings.engines.start_timeout_s, state,
            discovery=discovery,
        )  # fmt: skip
        api.state.deployer.adapters = lora  # deploys of versions that are adapters
        api.state.deployer.shared, api.state.deployer.supervised = shared, board is not None
        api.state.deployer.bases = rollout_shared.bases(settings.models)
        following = rollout_shared.start_following(shared, api.state.deployer, settings)
        if settings.retrieval.enabled:
            embed_model = settings.retrieval.embedding_model

            async def embed(texts: list[str], scope: str) -> list[list[float]]:
                return await proxy.embed_texts(embed_model, texts, scope)

            def count_retrieval(result: str) -> None:
                if metrics is not None:
                    metrics.retrieval.labels(result).inc()

            counter = _counter_for(registry, loaded, embed_model)
            proxy.rag = RetrievalGate(
                settings.retrieval, embed, counter, count_retrieval,
                limiter=limiter, model_tpm=limits.model_tpm,
            )  # fmt: skip
            api.state.retrieval = proxy.rag
        announcer: asyncio.Task[None] | None = None
        try:
            await fleet.start()
            kv.start(fleet)  # follows the KV events of kv_aware models' engines
            if lora is not None:
                await lora.start()  # fills each LoRA engine with its adapters once healthy
            await discovery.refresh_all()
            discovery.start()
            if follower is not None:  # the supervisor's engines, as remote replicas
                await follower.refresh()
                follower.start()
            announcer = asyncio.create_task(_announce(fleet, gateway.ready_timeout_s, on_ready))
            if batches is not None:
                batches.start()  # resumes batches left running (a restart, a crash)
            if meter is not None and meter.ledger is not None:
                meter.ledger.start()  # its writer thread
            # What start-up made lives as long as the process: out of the collector's way,
            # so a full collection walks what requests allocate, not every module's objects.
            gc.collect()
            gc.freeze()
            yield
        finally:
            if announcer is not None:
                announcer.cancel()
            await rollout_shared.stop_following(following, shared)
            if batches is not None:
                await batches.aclose()  # its requests in flight run again after a restart
            if getattr(api.state, "deployer", None) is not None:
                await api.state.deployer.aclose()
            await discovery.stop()
            if follower is not None:
                await follower.stop()
            if lora is not None:
                await lora.stop()
            await kv.stop()
            log.info("stopping engines")
            await fleet.stop()
            await session.close()
            if key_store is not None:
                await key_store.aclose()
            if limiter is not None:
                await limiter.aclose()
            if meter is not None and meter.ledger is not None:
                await asyncio.to_thread(meter.ledger.close)  # written, or spilled to disk
            if cache is not None:
                await cache.aclose()
            if getattr(api.state, "retrieval", None) is not None:
                await api.state.retrieval.aclose()
            if responses is not None:
                await responses.aclose()
            if provider is not None and tracer_provider is None:
                provider.shutdown()  # flushes the batch exporter

    api.state.settings = settings
    api.state.registry = registry
    api.state.key_store = key_store
    api.state.limiter = limiter
    api.state.meter = meter
    api.state.started = int(time.time())
    api.include_router(catalog.router)
    api.include_router(health.router)
    api.include_router(engines.router)
    api.include_router(admin.router)
    api.include_router(admin_limits.router)
    api.include_router(admin_usage.router)
    api.include_router(deploy.router)
    api.include_router(adapters.router)
    api.include_router(metrics_route.router)
    api.include_router(collections.router)
    api.include_router(batch_routes.router)
    api.openapi = _openapi(api)  # type: ignore[method-assign]

    def refused(path: str, error: BaseException) -> None:
        if metrics is not None and path in model_routes.MODEL_PATHS:
            metrics.refused(path, error)

    edge = model_routes.Edge(gateway.client_send_timeout_s, refused)
    responses = make_responses(settings, lambda: api.state.proxy)
    api.state.responses = responses
    batches = make_batches(
        settings.batches, lambda: api.state.proxy, metrics,
        _key_lookup(key_store) if keys.enabled else None,
        max_line_bytes=gateway.max_body_bytes, limiter=limiter,
    )  # fmt: skip
    api.state.batches = batches
    responded = responses_routes.routes(lambda: api.state.responses, edge) if responses else []
    router = Router(
        routes=[
            *model_routes.routes(lambda: api.state.proxy, edge),
            *responded,
            Mount("", app=api),
        ],
        lifespan=lifespan,
    )
    keys_gate = Keys(
        [k.get_secret_value() for k in gateway.api_keys],
        store=key_store if keys.enabled else None,
        admin_key=keys.admin_key.get_secret_value() if keys.admin_key else None,
        tracer=tracer,
    )
    front = Front(
        router, keys=keys_gate, max_body_bytes=gateway.max_body_bytes, tracer=tracer,
        refused=refused,
        body_limits={batch_routes.FILES: settings.batches.max_file_bytes + batch_routes.FORM_BYTES},
    )  # fmt: skip
    return Gateway(front, router, api)


def _key_lookup(store: KeyStore | None) -> KeyLookup | None:
    """A key's record now, by its hash (a batch resumed after a restart is its key's)."""
    if store is None:
        return None

    async def lookup(digest: str) -> KeyRecord | None:
        return next((r for r in await store.list() if r.hash == digest), None)

    return lookup


def _openapi(api: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document for its routes, with the model routes added from their table."""

    def document() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = get_openapi(
                title=api.title,
                version=api.version,
                routes=[
                    *model_routes.openapi_routes(),
                    *responses_routes.openapi_routes(),
                    *api.routes,
                ],
            )
        return api.openapi_schema

    return document


def _counter_for(
    registry: Registry, counters: Mapping[VersionKey, TokenCounter], model: str
) -> TokenCounter | None:
    try:
        return counters.get(registry.resolve(model).key)
    except WeirModelError:
        return None


def _make_cache(settings: Settings, metrics: Metrics | None) -> Cache | None:
    config = settings.cache
    if not config.enabled:
        return None
    store: CacheStore = (
        RedisCacheStore(config.redis_url, timeout_s=config.timeout_s)
        if config.redis_url
        else MemoryCacheStore(max_bytes=config.memory_max_bytes)
    )

    def count(kind: str, result: str, n: int) -> None:
        if metrics is not None and n:
            metrics.cache.labels(kind, result).inc(n)

    return Cache(
        store,
        ttl_s=config.ttl_s,
        max_entry_bytes=config.max_entry_bytes,
        charge_hits=config.charge_hits,
        count=count,
    )


async def _announce(fleet: Fleet, timeout_s: float, on_ready: OnReady | None) -> None:
    started = time.monotonic()
    if await fleet.wait_ready(timeout_s):
        log.info("all engines ready after %.1fs", time.monotonic() - started)
        if on_ready is not None:
            on_ready()
    else:
        log.error("engines not ready after %.0fs: %s", timeout_s, fleet.readiness())
