"""``create_app(settings)``: the gateway application, its middleware and its lifespan.

The lifespan opens the one pooled engine session, starts the fleet (local engines are
started, remote ones health-checked) and stops every engine on shutdown. The port is
served at once: ``/healthz`` answers while engines load, ``/readyz`` says when they are up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry.sdk.trace import TracerProvider
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.responses import Response

from models.engines.client import EngineTimeouts, json_dumps
from models.engines.discovery import DnsDiscovery
from models.engines.fleet import Fleet
from models.engines.launcher import ReplicaFactory, build_fleet, check_weights, load_counters
from models.errors import WeirModelError
from models.registry import Registry
from models.tokenizer import TokenCounter
from retrieval.service import RetrievalError
from serving.cache.service import Cache
from serving.cache.store import CacheStore, MemoryCacheStore, RedisCacheStore
from serving.core.answer import JSONBytes
from serving.core.proxy import Proxy
from serving.core.rag import RetrievalGate
from serving.errors import (
    ClientClosed,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    RouteNotFound,
    render,
)
from serving.http.front import Front, Keys, request_id_of
from serving.http.lane import InferenceLane
from serving.http.routes import (
    admin,
    admin_limits,
    catalog,
    collections,
    deploy,
    engines,
    health,
    inference,
    metrics_route,
)
from serving.http.validation import invalid_request_from
from serving.keys.cache import CachedKeyStore
from serving.keys.store import KeyStore, make_key_store
from serving.limits.limiter import Limiter
from serving.limits.stores import make_limit_store
from serving.observe.metrics import Metrics
from serving.observe.tracing import make_provider, tracer_from
from serving.rollout.deployer import Deployer, ReplicaMaker
from serving.rollout.state import RolloutState
from serving.routing.dispatch import Deadlines, Dispatcher
from serving.settings import Settings

log = logging.getLogger("weir.gateway")
FleetFactory = Callable[[aiohttp.ClientSession], Fleet]
DiscoveryFactory = Callable[[Fleet, aiohttp.ClientSession], DnsDiscovery]
ReplicasFactory = Callable[[aiohttp.ClientSession], ReplicaMaker]
OnReady = Callable[[], None]


def _error_response(request: Request, exc: BaseException) -> Response:
    status, body, headers = render(exc, request_id_of(request.scope))
    return JSONBytes(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientClosed):
        log.info("client closed request %s before the answer", request_id_of(request.scope))
    return _error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # registered for this type only
    return _error_response(request, invalid_request_from(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    mapped: Exception
    if status == 404:
        mapped = RouteNotFound(f"No route {request.method} {request.url.path}.")
    elif status == 405:
        mapped = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    else:
        mapped = InvalidRequest(str(getattr(exc, "detail", "")) or "Bad request.")
    return _error_response(request, mapped)


def create_app(
    settings: Settings,
    *,
    fleet_factory: FleetFactory | None = None,
    weights: dict[str, Path] | None = None,
    counters: dict[str, TokenCounter] | None = None,
    on_ready: OnReady | None = None,
    tracer_provider: TracerProvider | None = None,
    replicas_factory: ReplicasFactory | None = None,
    discovery_factory: DiscoveryFactory | None = None,
) -> FastAPI:
    """The gateway. Tests pass ``fleet_factory`` (fake engines), ``replicas_factory`` (what
    a deploy starts) and ``counters``; the CLI passes the ``weights`` it already checked.
    Otherwise all come from ``settings``."""
    gateway = settings.gateway
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
    )

    def resolved_weights() -> dict[str, Path]:
        if weights is not None:
            return weights
        if fleet_factory is not None:
            return {}
        return check_weights(settings.models, settings.store)

    def replica_maker(session: aiohttp.ClientSession) -> ReplicaMaker:
        if replicas_factory is not None:
            return replicas_factory(session)
        return ReplicaFactory(settings.engines, session, timeouts)

    def make_discovery(fleet: Fleet, session: aiohttp.ClientSession) -> DnsDiscovery:
        if discovery_factory is not None:
            return discovery_factory(fleet, session)
        return DnsDiscovery(fleet, ReplicaFactory(settings.engines, session, timeouts).remote)

    def make_fleet(session: aiohttp.ClientSession, found: dict[str, Path]) -> Fleet:
        if fleet_factory is not None:
            return fleet_factory(session)
        factory = ReplicaFactory(settings.engines, session, timeouts)
        return build_fleet(settings.models, found, factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=gateway.max_connections, limit_per_host=0)
        session = aiohttp.ClientSession(connector=connector, json_serialize=json_dumps)
        found = await asyncio.to_thread(resolved_weights)
        if counters is None:
            loaded = await asyncio.to_thread(load_counters, settings.models, found, settings.store)
        else:
            loaded = counters
        fleet = make_fleet(session, found)
        deadlines = Deadlines(gateway.engine_ttft_timeout_s, gateway.engine_total_timeout_s)
        dispatcher = Dispatcher(
            fleet, settings.models, deadlines, tracer=tracer, on_retry=count_retry
        )
        app.state.proxy = Proxy(
            registry, dispatcher, loaded, settings.contract, limiter, limits.model_tpm,
            metrics=metrics, tracer=tracer, log_requests=observe.access_log,
            cache=cache, cache_embeddings=settings.cache.embeddings,
        )  # fmt: skip
        proxy: Proxy = app.state.proxy
        discovery = make_discovery(fleet, session)
        for model in settings.models:
            for version in model.versions:
                if version.dns is not None and version.version in model.running():
                    discovery.track(model, version)
        app.state.deployer = Deployer(
            registry, fleet, dispatcher, proxy.counters, proxy.tracker, replica_maker(session),
            settings.store, settings.deploy, settings.engines.start_timeout_s, state,
            discovery=discovery,
        )  # fmt: skip
        if settings.retrieval.enabled:
            embed_model = settings.retrieval.embedding_model

            async def embed(texts: list[str]) -> list[list[float]]:
                return await proxy.embed_texts(embed_model, texts)

            def count_retrieval(result: str) -> None:
                if metrics is not None:
                    metrics.retrieval.labels(result).inc()

            counter = _counter_for(registry, loaded, embed_model)
            proxy.rag = RetrievalGate(settings.retrieval, embed, counter, count_retrieval)
            app.state.retrieval = proxy.rag
        announcer: asyncio.Task[None] | None = None
        try:
            await fleet.start()
            await discovery.refresh_all()
            discovery.start()
            announcer = asyncio.create_task(_announce(fleet, gateway.ready_timeout_s, on_ready))
            yield
        finally:
            if announcer is not None:
                announcer.cancel()
            if getattr(app.state, "deployer", None) is not None:
                await app.state.deployer.aclose()
            await discovery.stop()
            log.info("stopping engines")
            await fleet.stop()
            await session.close()
            if key_store is not None:
                await key_store.aclose()
            if limiter is not None:
                await limiter.aclose()
            if cache is not None:
                await cache.aclose()
            if getattr(app.state, "retrieval", None) is not None:
                await app.state.retrieval.aclose()
            if provider is not None and tracer_provider is None:
                provider.shutdown()  # flushes the batch exporter

    app = FastAPI(
        title="Weir gateway",
        version="0.1.0",
        lifespan=lifespan,
        middleware=[
            Middleware(
                Front,
                keys=Keys(
                    [k.get_secret_value() for k in gateway.api_keys],
                    store=key_store if keys.enabled else None,
                    admin_key=keys.admin_key.get_secret_value() if keys.admin_key else None,
                    tracer=tracer,
                ),
                max_body_bytes=gateway.max_body_bytes,
                tracer=tracer,
                lane=InferenceLane(lambda: app.state.proxy, gateway.max_body_bytes)
                if gateway.inference_lane
                else None,
            )
        ],
        exception_handlers={
            WeirModelError: _domain_error,
            GatewayError: _domain_error,
            RequestValidationError: _validation_error,
            StarletteHTTPException: _http_error,
            RetrievalError: _domain_error,
        },
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.key_store = key_store
    app.state.limiter = limiter
    app.state.started = int(time.time())
    app.include_router(inference.router)
    app.include_router(catalog.router)
    app.include_router(health.router)
    app.include_router(engines.router)
    app.include_router(admin.router)
    app.include_router(admin_limits.router)
    app.include_router(deploy.router)
    app.include_router(metrics_route.router)
    app.include_router(collections.router)
    return app


def _counter_for(
    registry: Registry, counters: Mapping[str, TokenCounter], model: str
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
