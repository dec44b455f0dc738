"""Rollout state shared by every gateway process (and the engine supervisor), in Redis.

One document holds every model's rollout: ``current``, ``split``, the running versions,
the previous version (``weir rollback``), versions added at runtime, and the operation in
progress (its phase, steps and gate decision), under a version number (``seq``) that a
Lua script increments with each write. Every process polls ``seq`` every
``deploy.follow_interval_s`` (0.1 s: one GET) and, when it moved, reads the document and
applies it (``Follower``): the split changes in every gateway within that interval plus
the time to health-check a version's new replicas, which each process does before it
sends the version any traffic. A process that starts mid-rollout lays the document over
its configuration before it builds its fleet, so it joins the rollout where it is.

Each model's record names the configuration it was made from (``base``: a digest of the
model's ``current``, ``split`` and versions as configured). A process whose configuration
of the model differs (a ``helm upgrade`` that set a new ``current`` or added a version)
serves its configuration and ignores the record, at start and when following, until a
rollout made from its configuration writes a new one: the last change wins, whether it
came from the admin API or from the configuration.

One rollout per model across the fleet: the gateway that takes a deploy holds the
model's lease (``SET NX PX``, ``lease_s``, renewed every third of it, released when the
rollout ends); another gateway asked to deploy the same model answers 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from models.config import ModelConfig
from serving.redis_client import bounded_redis, close
from serving.rollout.state import _overlay

if TYPE_CHECKING:
    from models.engines.engine_host import EngineHost
    from models.registry import Registry
    from serving.rollout.deployer import Deployer
    from serving.settings import Settings

log = logging.getLogger("weir.rollout")
PREFIX = "weir:rollout:"
SEQ, DOC, DOC_SEQ = PREFIX + "seq", PREFIX + "doc", PREFIX + "doc_seq"

# KEYS: seq, doc, the doc's seq. ARGV: the document (kept as given). One atomic step.
WRITE = """
local n = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], n)
return n
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class SharedState:
    """The document and the leases in Redis."""

    def __init__(self, url: str, timeout_s: float = 2.0, lease_s: float = 30.0) -> None:
        self.redis: aioredis.Redis = bounded_redis(url, timeout_s, connections=4)
        self.lease_s = lease_s
        self.owner = secrets.token_hex(8)  # this process, in lease values
        self.joined_at = 0  # the seq this process started from
        self._write = self.redis.register_script(WRITE)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)

    def __repr__(self) -> str:
        return f"SharedState(owner={self.owner!r})"

    async def seq(self) -> int:
        raw = await self.redis.get(SEQ)
        return int(raw) if raw is not None else 0

    async def load(self) -> dict[str, Any] | None:
        seq, raw = await self.redis.mget(DOC_SEQ, DOC)
        if raw is None:
            return None
        data = json.loads(raw)
        if not isinstance(data, dict):
            return None
        data["seq"] = int(seq or 0)
        return data

    async def write(self, models: dict[str, Any]) -> int:
        doc = json.dumps({"models": models, "writer": self.owner})
        seq: int = await self._write(keys=[SEQ, DOC, DOC_SEQ], args=[doc])
        return seq

    async def acquire(self, model: str) -> bool:
        return bool(
            await self.redis.set(PREFIX + "lease:" + model, self.owner, nx=True,
                                 px=int(self.lease_s * 1000))
        )  # fmt: skip

    async def holder(self, model: str) -> str | None:
        raw = await self.redis.get(PREFIX + "lease:" + model)
        return raw.decode() if isinstance(raw, bytes) else raw

    async def renew(self, model: str) -> bool:
        keys = [PREFIX + "lease:" + model]
        return bool(await self._renew(keys=keys, args=[self.owner, int(self.lease_s * 1000)]))

    async def release(self, model: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._release(keys=[PREFIX + "lease:" + model], args=[self.owner])

    async def hold(self, model: str) -> None:
        """Renew ``model``'s lease every third of it until cancelled."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.renew(model):
                    log.error("lost the rollout lease of %s", model)
            except (RedisError, OSError) as exc:
                log.warning("renewing the rollout lease of %s failed: %s", model, exc)

    async def aclose(self) -> None:
        await close(self.redis)


def base(model: ModelConfig) -> str:
    """A digest of what the configuration says of a model's rollout: its ``current``,
    ``split`` and versions (each one's name and whether it is a standby)."""
    said = {
        "current": model.current,
        "split": dict(sorted(model.split.items())),
        "versions": sorted((v.version, v.standby) for v in model.versions),
    }
    return hashlib.sha256(json.dumps(said).encode()).hexdigest()[:16]


def bases(models: list[ModelConfig]) -> dict[str, str]:
    return {model.name: base(model) for model in models}


def overlay(models: list[ModelConfig], doc: dict[str, Any] | None) -> list[ModelConfig]:
    """``models`` with the shared document's rollouts laid over them (joining mid-way);
    a model whose record was made from another configuration of it keeps its own."""
    records = (doc or {}).get("models") or {}
    out = []
    for model in models:
        record = records.get(model.name)
        if not isinstance(record, dict):
            out.append(model)
            continue
        made_from = record.get("base")
        if made_from is not None and made_from != base(model):
            log.info("%s: configured differently from its shared rollout: serving the"
                     " configuration", model.name)  # fmt: skip
            out.append(model)
            continue
        try:
            out.append(_overlay(model, record))
        except ValueError as exc:
            log.warning("ignoring the shared rollout of %s: %s", model.name, exc)
            out.append(model)
    return out


Apply = Callable[[int, dict[str, Any]], Awaitable[None]]


async def follow(state: SharedState, apply: Apply, *, since: int, interval_s: float = 0.1) -> None:
    """Call ``apply(seq, doc)`` each time the document's seq moves past ``since``."""
    seen = since
    while True:
        await asyncio.sleep(interval_s)
        try:
            seq = await state.seq()
            if seq <= seen:
                continue
            doc = await state.load()
        except (RedisError, OSError) as exc:
            log.warning("rollout state unreachable: %s", exc)
            continue
        if doc is None:
            continue
        seen = int(doc.get("seq", seq))
        if doc.get("writer") == state.owner:
            continue  # ours: this process holds that state already
        try:
            await apply(seen, doc)
        except Exception:  # the loop must outlive any one bad document
            log.exception("applying rollout state %d failed", seen)


def rollout_url(settings: Settings) -> str | None:
    deploy = settings.deploy
    return deploy.redis_url or (settings.keys.redis_url if deploy.shared else None)


def follow_for_engines(settings: Settings, host: EngineHost) -> Coroutine[Any, Any, None] | None:
    """The supervisor's follower: each model's running local versions from the document."""
    url = rollout_url(settings)
    if url is None:
        return None
    state = SharedState(url, settings.deploy.redis_timeout_s)
    configured = {m.name: m for m in settings.models}

    async def apply(seq: int, doc: dict[str, Any]) -> None:
        for model in overlay(list(configured.values()), doc):
            await host.want(model, model.running())
        log.info("rollout state %d applied to the engines", seq)

    async def run() -> None:
        try:
            doc = await state.load()
            if doc is not None:
                await apply(int(doc.get("seq", 0)), doc)
            await follow(
                state, apply, since=int((doc or {}).get("seq", 0)),
                interval_s=settings.deploy.follow_interval_s,
            )  # fmt: skip
        finally:
            await state.aclose()

    return run()


async def join(
    settings: Settings, registry: Registry
) -> tuple[SharedState | None, list[ModelConfig]]:
    """A gateway starting: the shared state (when configured) and its models with the
    document laid over them, the registry updated to match (a rollout joined mid-way)."""
    url = rollout_url(settings)
    if url is None:
        return None, settings.models
    state = SharedState(url, settings.deploy.redis_timeout_s, settings.deploy.lease_s)
    try:
        doc = await state.load()
    except (RedisError, OSError) as exc:
        log.error("rollout state unreachable at start (%s): serving the configuration", exc)
        doc = None
    state.joined_at = int((doc or {}).get("seq", 0))
    models = overlay(settings.models, doc)
    for model in models:
        if registry.model(model.name) is not None:
            registry.update(model, set(model.running()))
    return state, models


def start_following(
    state: SharedState | None, deployer: Deployer, settings: Settings
) -> asyncio.Task[None] | None:
    if state is None:
        return None
    configured = list(settings.models)

    async def apply(seq: int, doc: dict[str, Any]) -> None:
        await deployer.follow(seq, doc, configured)

    return asyncio.create_task(
        follow(state, apply, since=state.joined_at, interval_s=settings.deploy.follow_interval_s),
        name="rollout follower",
    )


async def stop_following(task: asyncio.Task[None] | None, state: SharedState | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if state is not None:
        await state.aclose()
