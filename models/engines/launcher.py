"""Builds the fleet from configuration: one replica per configured engine.

Local versions get a vLLM process per replica on a free loopback port; versions with a
``url`` are remote engines that are health-checked but never started or stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import socket
from collections.abc import Sequence
from pathlib import Path

from models import tool_calling
from models.adapters import engine_args as lora
from models.config import EngineConfig, ModelConfig, StoreConfig, VersionConfig
from models.engines import kv_events, vllm_engine
from models.engines.backoff import ExponentialBackoff
from models.engines.client import EngineTimeouts, HttpEngine
from models.engines.fleet import Fleet, Replica
from models.engines.placement import DeployPlan, EngineSpec, Host, Placement, plan, plan_deploy
from models.engines.placement.discover import discover
from models.engines.placement.types import describe
from models.engines.supervisor import EngineProcess
from models.store import ModelStore
from models.tokenizer import TokenCounter
from models.types import ReplicaKey, VersionKey

log = logging.getLogger("weir.launcher")


ENGINE_PORTS = (20000, 32767)  # below Linux's default ephemeral range (32768-60999)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_TRIES = 64
_handed_out: set[int] = set()  # ports given to this process's engines (not bound until they load)


def free_port() -> int:
    """A loopback port for a local engine, free now and outside the kernel's ephemeral
    range when the host's range leaves room for ``ENGINE_PORTS``.

    A port found free by binding to 0 comes from the ephemeral range, where every
    outgoing connection's source port comes from too: one made while the engine loads
    (the gateway's to Redis, a health check) can take it before the engine binds it, and
    the engine then fails on every restart. Ports outside the range are taken only by a
    server binding them on purpose; the bind here checks none does now, and none is
    handed out twice by this process."""
    low, high = ENGINE_PORTS
    first_ephemeral = _ephemeral_low()
    if first_ephemeral is not None:
        high = min(high, first_ephemeral - 1)
    for _ in range(PORT_TRIES if high >= low else 0):
        port = random.randint(low, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room: any free one
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


def _ephemeral_low() -> int | None:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def check_weights(models: list[ModelConfig], store: StoreConfig) -> dict[VersionKey, Path]:
    """Resolve (and verify, if configured) every running version's weights before start.

    Raises ``ModelNotInStore`` (whose message says ``weir models pull NAME``),
    ``VerificationFailed`` or ``StoreError``. Standby versions are checked when deployed.
    """
    resolved: dict[VersionKey, Path] = {}
    for model in models:
        running = model.running()
        for version in model.versions:
            if version.weights is not None and version.version in running:
                key = VersionKey(model.name, version.version)
                resolved[key] = version_weights(version, store)
    return resolved


def version_weights(version: VersionConfig, store: StoreConfig) -> Path:
    """One version's weights directory, verified against its manifest when configured."""
    assert version.weights is not None
    model_store = ModelStore(store.root)
    path = model_store.resolve(version.weights)
    if store.verify_on_start and model_store.has(version.weights):
        model_store.verify(version.weights)
    return path


def load_counters(
    models: list[ModelConfig], weights: dict[VersionKey, Path], store: StoreConfig
) -> dict[VersionKey, TokenCounter]:
    """A token counter per running version (see ``version_counter``)."""
    counters: dict[VersionKey, TokenCounter] = {}
    for model in models:
        running = model.running()
        for version in model.versions:
            key = VersionKey(model.name, version.version)
            if version.version not in running or version.base is not None:
                continue  # a version on another's engines counts with its base's counter
            counter = version_counter(key, version, weights.get(key), store, model.task)
            if counter is not None:
                counters[key] = counter
    return counters


def version_counter(
    key: VersionKey,
    version: VersionConfig,
    weights: Path | None,
    store: StoreConfig,
    task: str = "chat",
) -> TokenCounter | None:
    """From the version's weights, or its ``tokenizer`` for a remote one.

    A remote version without ``tokenizer`` gets none: its prompts are not counted.
    """
    if weights is not None:
        directory = weights
    elif version.tokenizer is not None:
        directory = ModelStore(store.root).resolve(version.tokenizer)
    else:
        log.warning("%s: no tokenizer configured; prompts are not counted", key)
        return None
    support = tool_calling.for_version(task, version, weights)
    return TokenCounter.from_dir(
        directory,
        version.engine_args,
        chat_template=support.template,
        calls_tools=support.calls_tools,
    )


def model_timeouts(model: ModelConfig, timeouts: EngineTimeouts) -> EngineTimeouts:
    own = model.timeouts
    return dataclasses.replace(
        timeouts,
        connect_s=own.connect_s or timeouts.connect_s,
        idle_s=own.idle_s or timeouts.idle_s,
        total_s=own.total_s or timeouts.total_s,
    )


@dataclasses.dataclass(frozen=True)
class ReplicaFactory:
    """Makes the replicas of one version: at start, and when a deploy starts a version."""

    engines: EngineConfig
    timeouts: EngineTimeouts
    machine: Host | None = None  # the host's devices as described; None: read on first use
    server: str | None = None  # the module run with python -m; None: engines.server (vLLM's)
    host: vllm_engine.HostKind = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", vllm_engine.host_kind(self.engines.host))

    def remote(
        self, model: ModelConfig, version: VersionConfig, key: ReplicaKey, url: str
    ) -> Replica:
        """A replica of a remote engine at ``url`` (configured, or found in DNS)."""
        timeouts = model_timeouts(model, self.timeouts)
        engine = HttpEngine(str(key), url, timeouts, headers=version.plain_headers)
        return Replica(key, engine, version.served_name or model.name)

    def __call__(
        self,
        model: ModelConfig,
        version: VersionConfig,
        weights: Path | None,
        placements: Sequence[Placement] | None = None,
    ) -> list[Replica]:
        """The version's replicas; a local one's on ``placements`` (one per replica), or
        planned alone on the host when none are given."""
        engines = self.engines
        backoff = ExponentialBackoff(engines.restart_backoff_base_s, engines.restart_backoff_cap_s)
        timeouts = model_timeouts(model, self.timeouts)
        served_name = version.served_name or model.name
        remote = version.remote
        if not remote and placements is None:
            placements = self.plan(model, version, weights, host=self.devices)
        replicas: list[Replica] = []
        for index in range(version.replica_count):
            key = ReplicaKey(model.name, version.version, index)
            if remote:
                replicas.append(self.remote(model, version, key, remote[index]))
                continue
            assert weights is not None, f"{key}: local version without weights"
            assert placements is not None
            placement = placements[index]
            port = free_port()
            cmd = vllm_engine.command(
                weights=weights,
                served_name=served_name,
                port=port,
                task=model.task,
                config=engines,
                extra_args=tool_calling.for_version(model.task, version, weights).engine_args()
                + lora.engine_args(version)
                + kv_events.engine_args(model, key)
                + version.engine_args,
                host=self.host,
                placement=placement,
                server=self.server or engines.server,
            )
            process = EngineProcess(
                str(key),
                cmd,
                env=vllm_engine.environment(
                    engines, lora.engine_env(version) | version.env, self.host, placement
                ),
                cpus=placement.cpus if self.host == "cpu" else (),
                log_path=engines.log_dir.expanduser()
                / f"{model.name}@{version.version}-{index}.log",
                grace_s=engines.stop_grace_s,
                backoff=backoff,
            )
            url = f"http://127.0.0.1:{port}"
            engine = HttpEngine(str(key), url, timeouts, headers=version.plain_headers)
            replicas.append(Replica(key, engine, served_name, process, placement=placement))
        return replicas

    @functools.cached_property
    def devices(self) -> Host:
        """The host's GPUs or cores, read once, on first use (before engines start)."""
        return self.machine if self.machine is not None else discover(self.host)

    def spec(self, model: ModelConfig, version: VersionConfig, weights: Path | None) -> EngineSpec:
        key = VersionKey(model.name, version.version)
        return vllm_engine.engine_spec(key, version, weights, self.engines)

    def plan(
        self,
        model: ModelConfig,
        version: VersionConfig,
        weights: Path | None,
        *,
        host: Host,
        running: Sequence[Placement] = (),
    ) -> tuple[Placement, ...]:
        """Devices for one local version's replicas beside ``running``."""
        spec = self.spec(model, version, weights)
        return plan(host, [spec], running=running, cap=self.engines.gpu_memory_cap)

    def plan_deploy(
        self,
        model: ModelConfig,
        version: VersionConfig,
        weights: Path | None,
        *,
        host: Host,
        running: Sequence[Placement],
        replacing: VersionKey | None,
    ) -> DeployPlan:
        """Where a deployed version's replicas go while ``running`` keeps serving."""
        spec = self.spec(model, version, weights)
        return plan_deploy(host, spec, running, replacing, cap=self.engines.gpu_memory_cap)


def build_fleet(
    models: list[ModelConfig], weights: dict[VersionKey, Path], factory: ReplicaFactory
) -> Fleet:
    """The fleet of every running version's replicas (standby versions start on deploy).

    Local versions are placed together first (``PlacementRefused``, with the numbers,
    when they do not fit): each replica gets its GPUs and memory fraction, or its cores.
    """
    running = [
        (model, version)
        for model in models
        for version in model.versions
        if version.version in model.running() and version.base is None  # base: none its own
    ]
    local = [(m, v) for m, v in running if not v.remote and v.dns is None]
    host = factory.devices if local else None
    placed: dict[VersionKey, list[Placement]] = {}
    if host is not None:
        specs = [factory.spec(m, v, weights.get(VersionKey(m.name, v.version))) for m, v in local]
        for each in plan(host, specs, cap=factory.engines.gpu_memory_cap):
            placed.setdefault(each.replica.version_key, []).append(each)
    replicas: list[Replica] = []
    for model, version in running:
        key = VersionKey(model.name, version.version)
        replicas += factory(model, version, weights.get(key), placed.get(key, []))
    log.info("fleet on a %s host: %d replicas", factory.host, len(replicas))
    for replica in replicas:
        if replica.placement is not None:
            log.info("placed %s", describe(replica.placement))
    engines = factory.engines
    return Fleet(
        replicas,
        host=host,
        health_interval_s=engines.health_interval_s,
        start_timeout_s=engines.start_timeout_s,
        unhealthy_after=engines.unhealthy_after,
    )
