"""Deploys, canaries, gated promotion and rollbacks of a model's versions, at runtime.

A deploy of version V of model M:

1. *check* (before answering): V is known (configured, or given weights, or the store
   entry ``M-V`` that ``weir models add`` made), its weights would load and match their
   manifest; anything wrong is refused with the reasons and nothing changes;
2. *start* V's engines (local processes, or remote URLs health-checked) and wait until
   every one is healthy; an engine that exits during start-up fails the deploy at once;
3. *warm* each new replica with a few requests sent to it directly;
4. *shift*: all traffic to V (``current = V``), or the canary share (``split``);
5. for a full switch, *drain* the old versions (new requests already go to V; those
   resolved before the shift finish, counted by ``VersionTracker``) and *stop* them.

A failure in steps 2-3 stops what was started and leaves traffic where it was. A gated
canary watches both versions for ``window_s`` and then promotes (step 5) or rolls back
(the split returns to the stable version and the canary's engines are stopped) by
itself, logging the figures. One rollout per model at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from models.config import ModelConfig, StoreConfig, VersionConfig
from models.engines.discovery import DnsDiscovery
from models.engines.engine_host import is_local
from models.engines.fleet import Fleet, Replica
from models.engines.launcher import ReplicaFactory, version_counter
from models.engines.placement import Placement, PlacementRefused
from models.engines.placement.types import describe
from models.errors import EngineError, StoreError, WeirModelError
from models.registry import Registry, split_name
from models.store import ModelStore, loadable_problems
from models.tokenizer import TokenCounter
from models.types import VersionKey
from serving.errors import DeployInProgress, DeployRefused, GatewayError, RouteNotFound
from serving.rollout import gate
from serving.rollout.operation import DeployFailed, DeployRequest, GateSpec, Operation
from serving.rollout.shared import SharedState, overlay
from serving.rollout.state import RolloutState
from serving.rollout.tracker import VersionTracker
from serving.routing.dispatch import Dispatcher
from serving.settings import DeployConfig

log = logging.getLogger("weir.rollout")
ReplicaMaker = Callable[..., list[Replica]]  # (model, version, weights[, placements])
WARM_CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


class AdapterAttacher(Protocol):
    """Loads a stored adapter into every engine of its base (``serving.adapters``)."""

    async def attach(self, base: VersionKey, name: str) -> dict[str, Any]: ...


class Deployer:
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        dispatcher: Dispatcher,
        counters: dict[VersionKey, TokenCounter],
        tracker: VersionTracker,
        make_replicas: ReplicaMaker,
        store: StoreConfig,
        config: DeployConfig,
        start_timeout_s: float,
        state: RolloutState | None = None,
        *,
        counter_loader: Callable[[VersionKey, VersionConfig, Path | None], TokenCounter | None]
        | None = None,
        discovery: DnsDiscovery | None = None,
    ) -> None:
        self.discovery = discovery
        self.adapters: AdapterAttacher | None = None  # set when a version has LoRA on
        self.registry = registry
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.counters = counters
        self.tracker = tracker
        self.make_replicas = make_replicas
        self.store = store
        self.config = config
        self.start_timeout_s = config.start_timeout_s or start_timeout_s
        self.state = state
        self.load_counter = counter_loader or (
            lambda key, version, weights: version_counter(key, version, weights, store)
        )
        self.previous: dict[str, str] = dict(state.previous) if state else {}
        self.operations: dict[str, Operation] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.shared: SharedState | None = None  # fleet-wide state (serving.rollout.shared)
        self.supervised = False  # local engines come from `weir engines` (the board)
        self.bases: dict[str, str] = {}  # each model's configuration (shared.base), in records
        self.shared_ops: dict[str, dict[str, Any]] = {}  # rollouts other gateways run
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Deployer(models={[m.name for m in self.registry.models]!r})"

    # ---- what callers see

    def status(self, name: str) -> dict[str, Any]:
        model = self._model(name)
        operation = self.operations.get(name)
        return {
            "model": name,
            "current": model.current,
            "split": model.shares(),
            "running": self.registry.running(name),
            "versions": [v.version for v in model.versions],
            "previous": self.previous.get(name),
            "replicas": [
                {
                    "replica": str(r.key),
                    "healthy": r.healthy,
                    "outstanding": self.dispatcher.load_of(r).outstanding,
                }
                for r in self.fleet.replicas
                if r.key.model == name
            ],
            "in_flight": {
                v: self.tracker.inflight[VersionKey(name, v)] for v in self.registry.running(name)
            },
            "operation": operation.view() if operation else self.shared_ops.get(name),
        }

    async def deploy(self, name: str, asked: DeployRequest) -> Operation:
        """Check now (refusals raise ``DeployRefused``), then roll out in the background."""
        self._model(name)
        self._not_busy(name)
        await self._lease(name)
        try:
            return await self._deploy_checked(name, asked)
        except BaseException:
            if self.shared is not None:
                await self.shared.release(name)
            raise

    async def _deploy_checked(self, name: str, asked: DeployRequest) -> Operation:
        model = self._model(name)
        gate_spec = self._gate(asked)
        running = self.registry.running(name)
        shares = model.shares()
        if asked.canary is not None and not 0 < asked.canary < 100:
            raise DeployRefused("canary must be a percentage between 0 and 100 (exclusive).")
        if gate_spec is not None and asked.canary is None:
            raise DeployRefused("promote_if gates a canary: give canary as well.")
        if asked.canary is None and shares == {asked.version: 1.0} and running == [asked.version]:
            raise DeployRefused(f"{name}@{asked.version} already serves all of {name}'s traffic.")
        if asked.canary is not None:
            if len(shares) > 1:
                raise DeployRefused(
                    f"{name} already splits its traffic {shares}: promote (deploy the canary"
                    " without canary) or roll back first."
                )
            if asked.version == model.current:
                raise DeployRefused(f"{name}@{asked.version} is the stable version already.")
        version, updated = self._version(model, asked)
        weights = None
        if asked.version not in running:
            weights = await asyncio.to_thread(self._check_weights, name, version)
            replacing = None if asked.canary is not None else model.current
            self._placements(model, version, weights, replacing)  # refused before it starts
        kind = "canary" if asked.canary is not None else "deploy"
        operation = Operation(kind, name, asked.version)
        if gate_spec is not None:
            operation.gate = gate_spec.describe()
        self.operations[name] = operation
        self._spawn(name, self._deploy(operation, updated, version, weights, asked, gate_spec))
        return operation

    async def rollback(self, name: str) -> Operation:
        """Back to the stable version (a canary) or the previous one (a full deploy)."""
        self._not_busy(name)
        await self._lease(name)
        try:
            return await self._rollback_checked(name)
        except BaseException:
            if self.shared is not None:
                await self.shared.release(name)
            raise

    async def _rollback_checked(self, name: str) -> Operation:
        model = self._model(name)
        shares = model.shares()
        if len(shares) > 1:
            canary = [v for v in shares if v != model.current]
            operation = Operation("rollback", name, model.current)
            self.operations[name] = operation
            self._spawn(name, self._end_canary(operation, model, canary, promote=False))
            return operation
        previous = self.previous.get(name)
        if previous is None:
            raise DeployRefused(f"{name} has no previous version to roll back to.")
        version = model.version(previous)
        weights = None
        if previous not in self.registry.running(name):
            weights = await asyncio.to_thread(self._check_weights, name, version)
        operation = Operation("rollback", name, previous)
        self.operations[name] = operation
        asked = DeployRequest(version=previous)
        self._spawn(name, self._deploy(operation, model, version, weights, asked, None))
        return operation

    async def set_split(self, name: str, split: dict[str, float]) -> dict[str, Any]:
        """Change the split among running versions (no engines start or stop)."""
        model = self._model(name)
        self._not_busy(name)
        running = set(self.registry.running(name))
        unknown = set(split) - running
        if unknown:
            raise DeployRefused(
                f"versions {sorted(unknown)} are not running; running: {sorted(running)}"
            )
        try:
            updated = ModelConfig.model_validate(
                {**model.model_dump(), "split": split if len(split) > 1 else {}}
                | ({"current": next(iter(split))} if len(split) == 1 else {})
            )
        except ValueError as exc:
            raise DeployRefused(str(exc)) from None
        if updated.current not in running:
            raise DeployRefused(f"current version {updated.current} is not running")
        self._apply(updated, running)
        return self.status(name)

    async def wait(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- checks

    def _model(self, name: str) -> ModelConfig:
        model = self.registry.model(name)
        if model is None:
            raise RouteNotFound(f"No model named '{name}'.")
        return model

    def _not_busy(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None and not task.done():
            operation = self.operations[name]
            raise DeployInProgress(
                f"A {operation.kind} of {name}@{operation.version} is running"
                f" ({operation.phase}); wait for it or roll back."
            )

    def _gate(self, asked: DeployRequest) -> GateSpec | None:
        if asked.promote_if is None:
            return None
        try:
            terms = gate.parse(asked.promote_if)
        except gate.GateSyntaxError as exc:
            raise DeployRefused(f"promote_if: {exc}") from None
        if asked.window_s <= 0:
            raise DeployRefused("window_s must be positive.")
        return GateSpec(
            terms, asked.window_s, asked.min_requests or self.config.min_canary_requests
        )

    def _version(
        self, model: ModelConfig, asked: DeployRequest
    ) -> tuple[VersionConfig, ModelConfig]:
        """The version's configuration, and the model's with it (added if it is new)."""
        known = {v.version: v for v in model.versions}
        given = asked.weights is not None or bool(asked.urls)
        if asked.version in known:
            if given:
                raise DeployRefused(
                    f"{model.name}@{asked.version} is configured already; its weights come from"
                    " the configuration. Deploy it by name, or give the new weights a new version."
                )
            return known[asked.version], model
        template = model.version(model.current)
        weights = asked.weights
        if weights is None and not asked.urls:
            entry = f"{model.name}-{asked.version}"
            if not ModelStore(self.store.root).has(entry):
                raise DeployRefused(
                    f"{model.name}@{asked.version} is not configured, no weights were given and"
                    f" the store has no entry {entry}. Register them first: weir models add"
                    f" {model.name} --version {asked.version} --path DIR"
                )
            weights = entry
        try:
            version = VersionConfig(
                version=asked.version,
                weights=None if asked.urls else weights,
                urls=list(asked.urls),
                served_name=template.served_name,
                replicas=asked.replicas or template.replicas,
                engine_args=(
                    template.engine_args if asked.engine_args is None else asked.engine_args
                ),
                env=dict(template.env),
                tokenizer=template.tokenizer if asked.urls else None,
                # remote engines publish KV events where the stable version's do (each
                # at its own URL's host); local ones are started with them (kv_aware)
                kv_events_port=template.kv_events_port if asked.urls else None,
                kv_replay_port=template.kv_replay_port if asked.urls else None,
            )
        except ValueError as exc:
            raise DeployRefused(f"invalid version: {exc}") from None
        updated = model.model_copy(update={"versions": [*model.versions, version]})
        return version, updated

    def _placements(
        self,
        model: ModelConfig,
        version: VersionConfig,
        weights: Path | None,
        replacing: str | None,
    ) -> tuple[Placement, ...] | None:
        """Where a local version's new engines go, beside what runs (``None``: remote, or
        replicas not made by the launcher); ``DeployRefused`` when they do not fit, with
        the numbers and, where one would fit, the rolling swap that would."""
        factory, host = self.make_replicas, self.fleet.host
        local = version.weights is not None and not version.remote and version.dns is None
        if not local or host is None or not isinstance(factory, ReplicaFactory):
            return None
        old = VersionKey(model.name, replacing) if replacing is not None else None
        try:
            plan = factory.plan_deploy(
                model, version, weights, host=host, running=self.fleet.placements(),
                replacing=old,
            )  # fmt: skip
        except PlacementRefused as exc:
            raise DeployRefused(str(exc)) from None  # it names the version and the numbers
        if plan.kind != "beside":
            raise DeployRefused(
                f"{plan.note}. A rolling swap would fit"
                f" (capacity reduced, never zero): {plan.describe()}. Weir does not run"
                " rolling swaps by itself: free the GPUs (fewer replicas of what runs) or"
                " give the version less memory (--gpu-memory-utilization in engine_args)."
            )
        return plan.placements

    def _check_weights(self, name: str, version: VersionConfig) -> Path | None:
        """The weights' directory, after checking they would load; ``DeployRefused``."""
        if version.weights is None:
            return None
        store = ModelStore(self.store.root)
        try:
            path = store.resolve(version.weights)
        except StoreError as exc:
            raise DeployRefused(f"{name}@{version.version}: {exc}") from None
        problems = loadable_problems(path)
        if not problems and store.has(version.weights) and self.store.verify_on_start:
            try:
                store.verify(version.weights)
            except StoreError as exc:
                problems = [str(exc)]
        if problems:
            raise DeployRefused(
                f"{name}@{version.version}: the weights would not load: " + "; ".join(problems)
            )
        return path

    # ---- the rollout itself (background)

    def _spawn(self, name: str, work: Any) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())

        operation = self.operations[name]

        async def run() -> None:
            holding = (
                asyncio.create_task(self.shared.hold(name)) if self.shared is not None else None
            )
            async with lock:
                try:
                    await work
                except Exception as exc:  # a rollout must end in a phase, never hang in one
                    log.exception("%s of %s failed", operation.kind, name)
                    operation.error = f"{type(exc).__name__}: {exc}"
                    operation.step("failed", reason=operation.error)
                finally:
                    self._save()  # the operation's last phase, fleet-wide
                    if holding is not None and self.shared is not None:
                        holding.cancel()
                        await self._outbox.join()  # written before another may lead
                        await self.shared.release(name)

        self._tasks[name] = asyncio.create_task(run(), name=f"rollout {name}")

    async def _deploy(
        self,
        operation: Operation,
        model: ModelConfig,
        version: VersionConfig,
        weights: Path | None,
        asked: DeployRequest,
        gate_spec: GateSpec | None,
    ) -> None:
        name = model.name
        stable = self._model(name).current
        try:
            started = await self._start(operation, model, version, weights)
        except DeployFailed as exc:
            operation.error = str(exc)
            operation.step("failed", reason=str(exc))
            return
        running = set(self.registry.running(name))
        if version.version not in running:  # running, no traffic yet: followers get ready
            self._apply(model.model_copy(update={"current": stable}), running | {version.version})
            running.add(version.version)
            await self._settle()
        if asked.canary is not None:
            share = asked.canary
            updated = model.model_copy(
                update={"split": {stable: 100 - share, version.version: share}}
            )
            self._apply(updated, running | {version.version})
            operation.step("canary", share=share, started_engines=started)
            if gate_spec is None:
                return
            operation.step("watching", gate=operation.gate)
            await self._watch(operation, gate_spec, stable, version.version)
            return
        old = sorted(running - {version.version})
        updated = model.model_copy(update={"current": version.version, "split": {}})
        self._apply(updated, {version.version})
        operation.step("shifted", to=version.version, started_engines=started)
        if stable != version.version:
            self.previous[name] = stable
        await self._retire(operation, name, old)
        self._save()
        operation.step("done")

    async def _start(
        self, operation: Operation, model: ModelConfig, version: VersionConfig, weights: Path | None
    ) -> int:
        """Start, health-check and warm ``version``'s replicas; how many were started."""
        key = VersionKey(model.name, version.version)
        if version.version in self.registry.running(model.name):
            return 0
        if version.base is not None:
            await self._attach(operation, model, version)
            return 0
        try:
            counter = await asyncio.to_thread(self.load_counter, key, version, weights)
            self.dispatcher.configure(model)
            if version.dns is not None and self.discovery is not None:
                self.discovery.track(model, version)
                replicas = await self.discovery.refresh(key)  # added to the fleet
                self.dispatcher.adopt(replicas)
                operation.step("starting", replicas=len(replicas), dns=version.dns)
                if not replicas:
                    raise DeployFailed(f"{version.dns} resolves to no engines")
            elif self.supervised and is_local(version):
                replicas = await self._from_board(operation, model, version)
            else:
                placements = self._placements(
                    model, version, weights, self._model(key.model).current
                )
                if placements is None:
                    replicas = self.make_replicas(model, version, weights)
                else:
                    replicas = self.make_replicas(model, version, weights, placements)
                    operation.step("placed", on=[describe(p) for p in placements])
                self.dispatcher.adopt(replicas)
                operation.step("starting", replicas=len(replicas))
                await self.fleet.add(replicas)
            reason = await self.fleet.wait_healthy(replicas, self.start_timeout_s)
            if reason is None:
                operation.step("warming", requests=self.config.warm_requests)
                reason = await self._warm(model, replicas)
            if reason is not None:
                reason += _log_tail(replicas)
        except DeployFailed as exc:
            reason = str(exc)
        except Exception as exc:  # anything unforeseen fails the deploy, never hangs it
            log.exception("%s: starting the version failed", key)
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            await self.fleet.remove(key)
            raise
        if reason is not None:
            if self.discovery is not None:
                self.discovery.untrack(key)
            await self.fleet.remove(key)
            raise DeployFailed(reason)
        if counter is not None:
            self.counters[key] = counter
        return len(replicas)

    async def _attach(self, operation: Operation, _: ModelConfig, version: VersionConfig) -> None:
        """A version on another's engines: its adapter loaded into every one of them."""
        if version.base is None:
            return
        model_name, base_version = split_name(version.base)
        if base_version not in self.registry.running(model_name):
            raise DeployFailed(f"its base {version.base} is not running")
        if version.adapter is None:
            operation.step("on_base", base=version.base)
            return
        if self.adapters is None:
            raise DeployFailed(f"{version.base} does not have LoRA on (lora = true)")
        try:
            view = await self.adapters.attach(VersionKey(model_name, base_version), version.adapter)
        except (GatewayError, WeirModelError) as exc:
            raise DeployFailed(f"adapter {version.adapter}: {exc}") from None
        held = [r["replica"] for r in view["replicas"] if r["holds"]]
        operation.step("loaded", adapter=version.adapter, base=version.base, replicas=held)

    async def _warm(self, model: ModelConfig, replicas: list[Replica]) -> str | None:
        path = "/v1/embeddings" if model.task == "embed" else "/v1/chat/completions"
        for replica in replicas:
            body: dict[str, Any] = (
                {"input": ["warm up"]} if model.task == "embed" else dict(WARM_CHAT)
            )
            body["model"] = replica.served_name
            for _ in range(self.config.warm_requests):
                try:
                    async with asyncio.timeout(self.config.warm_timeout_s):
                        await replica.engine.complete(path, body)
                except (EngineError, TimeoutError) as exc:
                    return f"warm-up request to {replica.key} failed: {exc or type(exc).__name__}"
        return None

    async def _watch(self, operation: Operation, spec: GateSpec, stable: str, canary: str) -> None:
        name = operation.model
        since = self.tracker.clock()
        await asyncio.sleep(spec.window_s)
        verdict = gate.judge(
            spec.terms,
            self.tracker.since(VersionKey(name, canary), since),
            self.tracker.since(VersionKey(name, stable), since),
            spec.min_requests,
        )
        operation.decision = {
            "promote": verdict.promote,
            "reasons": verdict.reasons,
            "canary": verdict.canary.as_dict(),
            "stable": verdict.stable.as_dict(),
        }
        log.warning(
            "canary %s@%s %s: %s; canary %s, stable %s",
            name, canary, "promoted" if verdict.promote else "rolled back",
            "; ".join(verdict.reasons), verdict.canary.as_dict(), verdict.stable.as_dict(),
        )  # fmt: skip
        await self._end_canary(operation, self._model(name), [canary], promote=verdict.promote)

    async def _end_canary(
        self, operation: Operation, model: ModelConfig, canaries: list[str], *, promote: bool
    ) -> None:
        name = model.name
        stable = model.current
        if promote:
            winner = canaries[0]
            updated = model.model_copy(update={"current": winner, "split": {}})
            self._apply(updated, {winner})
            self.previous[name] = stable
            operation.step("shifted", to=winner)
            await self._retire(operation, name, [stable])
            self._save()
            operation.step("promoted")
            return
        updated = model.model_copy(update={"split": {}})
        self._apply(updated, {stable})
        operation.step("shifted", to=stable)
        await self._retire(operation, name, canaries)
        self._save()
        operation.step("rolled_back")

    async def _retire(self, operation: Operation, name: str, versions: list[str]) -> None:
        """Wait for each version's requests to finish, then stop its engines."""
        for version in versions:
            key = VersionKey(name, version)
            operation.step("draining", version=version, in_flight=self.tracker.inflight[key])
            if not await self.tracker.drained(key, self.config.drain_timeout_s):
                log.error(
                    "%s: %d requests still running after %gs; stopping it anyway",
                    key, self.tracker.inflight[key], self.config.drain_timeout_s,
                )  # fmt: skip
            operation.step("stopping", version=version)
            if self.discovery is not None:
                self.discovery.untrack(key)
            if self.supervised and is_local(self._model(name).version(version)):
                operation.step("released", version=version)  # `weir engines` stops them
                continue
            gone = await self.fleet.remove(key)
            operation.step("stopped", version=version, replicas=len(gone))

    def _apply(self, model: ModelConfig, running: set[str]) -> None:
        self.registry.update(model, running)
        self.dispatcher.configure(model)
        self._save()

    def _save(self) -> None:
        if self.state is not None:
            self.state.save(self.registry, self.previous)
        if self.shared is not None:
            self._outbox.put_nowait(self._document())
            if self._publisher is None:
                self._publisher = asyncio.create_task(self._publish(), name="rollout publisher")

    def _document(self) -> dict[str, Any]:
        """Every model's rollout as the shared state holds it (``RolloutState``'s record
        plus the operation in progress, with its gate decision)."""
        data: dict[str, Any] = {}
        for model in self.registry.models:
            operation = self.operations.get(model.name)
            data[model.name] = {
                "current": model.current,
                "split": model.split,
                "running": self.registry.running(model.name),
                "previous": self.previous.get(model.name),
                "versions": [v.model_dump(mode="json") for v in model.versions],
                "operation": operation.view() if operation else self.shared_ops.get(model.name),
                "base": self.bases.get(model.name),  # the configuration it was made from
            }
        return data

    async def _publish(self) -> None:
        """Writes the documents in the order they were made (one writer per process)."""
        assert self.shared is not None
        while True:
            document = await self._outbox.get()
            try:
                seq = await self.shared.write(document)
                log.info("rollout state %d written", seq)
            except Exception as exc:  # the rollout goes on here; followers catch up later
                log.error("writing the shared rollout state failed: %s", exc)
            finally:
                self._outbox.task_done()

    async def _settle(self) -> None:
        """Wait until what was saved is written (followers read it from then on)."""
        if self.shared is not None:
            await self._outbox.join()

    async def _lease(self, name: str) -> None:
        """This model's fleet-wide rollout lease, or ``DeployInProgress``."""
        if self.shared is None:
            return
        try:
            if await self.shared.acquire(name):
                return
        except Exception as exc:
            raise DeployRefused(f"the shared rollout state is unreachable: {exc}") from None
        raise DeployInProgress(
            f"A rollout of {name} is in progress through another gateway; wait for it to"
            " finish (weir deployments) and try again."
        )

    async def _from_board(
        self, operation: Operation, model: ModelConfig, version: VersionConfig
    ) -> list[Replica]:
        """A local version under `weir engines`: say it runs (no traffic), and wait until
        the supervisor's engines for it are on the board and in our fleet."""
        key = VersionKey(model.name, version.version)
        running = set(self.registry.running(model.name)) | {version.version}
        stable = self._model(model.name).current
        self._apply(
            model.model_copy(update={"current": stable, "split": self._model(model.name).split}),
            running,
        )
        await self._settle()
        operation.step("starting", replicas=version.replica_count, by="weir engines")
        deadline = time.monotonic() + self.start_timeout_s
        while not (replicas := [r for r in self.fleet.replicas if r.key.version_key == key]):
            if time.monotonic() > deadline:
                self._apply(self._model(model.name), running - {version.version})
                raise DeployFailed(f"weir engines did not start {key} in {self.start_timeout_s:g}s")
            await asyncio.sleep(0.1)
        return replicas

    # ---- following the rollouts other gateways run (the shared state)

    async def follow(self, seq: int, doc: dict[str, Any], configured: list[ModelConfig]) -> None:
        """Apply the shared state: each model's new replicas first (healthy, or the
        switch waits up to ``switch_timeout_s``), then its split, then retire the old."""
        records = doc.get("models") or {}
        for model in overlay(configured, doc):
            name = model.name
            record = records.get(name) or {}
            task = self._tasks.get(name)
            if task is not None and not task.done():
                continue  # ours: what we wrote
            if record.get("operation") is not None:
                self.shared_ops[name] = record["operation"]
            if record.get("previous"):
                self.previous[name] = str(record["previous"])
            now = self._model(name)
            new = set(model.running())
            old = set(self.registry.running(name))
            if new == old and now.current == model.current and now.split == model.split:
                continue
            for version in sorted(new - old):
                await self._join(model, model.version(version))
            self.registry.update(model, new)
            self.dispatcher.configure(model)
            log.info("rollout state %d: %s current %s split %s running %s",
                     seq, name, model.current, model.shares(), sorted(new))  # fmt: skip
            for version in sorted(old - new):
                retire = asyncio.create_task(self._let_go(VersionKey(name, version), now))
                self._retiring.add(retire)
                retire.add_done_callback(self._retiring.discard)

    async def _join(self, model: ModelConfig, version: VersionConfig) -> None:
        """Replicas of a version another gateway started, healthy before any traffic."""
        key = VersionKey(model.name, version.version)
        self.dispatcher.configure(model)
        replicas = [r for r in self.fleet.replicas if r.key.version_key == key]
        if not replicas and version.base is None and not (self.supervised and is_local(version)):
            if version.dns is not None and self.discovery is not None:
                self.discovery.track(model, version)
                replicas = await self.discovery.refresh(key)
            else:
                weights = await asyncio.to_thread(self._check_weights, model.name, version)
                replicas = self.make_replicas(model, version, weights)
                await self.fleet.add(replicas)
            self.dispatcher.adopt(replicas)
        if key not in self.counters and version.base is None:
            weights = await asyncio.to_thread(self._check_weights, model.name, version)
            counter = await asyncio.to_thread(self.load_counter, key, version, weights)
            if counter is not None:
                self.counters[key] = counter
        if version.base is not None:
            return
        deadline = time.monotonic() + self.config.switch_timeout_s
        while time.monotonic() < deadline:
            replicas = [r for r in self.fleet.replicas if r.key.version_key == key]
            if replicas and any(r.healthy for r in replicas):
                return
            await self.fleet.check_once()
            if not any(r.healthy for r in replicas):
                await asyncio.sleep(0.05)
        log.error("%s: no healthy replica after %gs; following the rollout anyway",
                  key, self.config.switch_timeout_s)  # fmt: skip

    async def _let_go(self, key: VersionKey, model: ModelConfig) -> None:
        """A version another gateway retired: our requests on it finish, then it goes."""
        await self.tracker.drained(key, self.config.drain_timeout_s)
        if self.discovery is not None:
            self.discovery.untrack(key)
        local = is_local(model.version(key.version))
        if not (self.supervised and local):
            await self.fleet.remove(key)


def _log_tail(replicas: list[Replica], lines: int = 3) -> str:
    """The last lines of the first failed engine's log, to say why."""
    for replica in replicas:
        process = replica.process
        if process is None:
            continue
        with contextlib.suppress(OSError):
            tail = process.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
            if tail:
                return " | engine log: " + " / ".join(line.strip()[:300] for line in tail)
    return ""
