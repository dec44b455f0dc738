"""GPU placement: which GPUs each engine replica gets, and its memory fraction.

Every replica needs ``memory_bytes`` on each GPU of its tensor-parallel group (its share
of the weights, its KV cache budget, CUDA's own overhead). All engines on one GPU
together take at most ``cap`` of its memory (vLLM's own default is 0.9) and never more
than was free when the host was read. Replicas go where the fewest engines are already
(spreading replicas over GPUs), a TP group on contiguous GPUs of one NVLink island or
NUMA node; what is left on a GPU after the needs is shared between the new engines on
it in proportion to their needs (more KV cache for the big model, a little for the
small one). vLLM's ``--gpu-memory-utilization`` is a per-instance share of the GPU's
total memory, so engines sharing a GPU get fractions that add up to at most ``cap``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from models.engines.placement.types import (
    DeployPlan,
    EngineSpec,
    Gpu,
    GpuHost,
    Placement,
    PlacementRefused,
    SwapStep,
    core_list,
    gib,
)
from models.types import ReplicaKey

CAP = 0.9


@dataclass
class _Ledger:
    """What is left on each GPU while a plan is made (bytes, and engines placed there)."""

    gpus: dict[int, Gpu]
    left: dict[int, float]
    engines: dict[int, int]
    needs: dict[ReplicaKey, float] = field(default_factory=dict)  # new replicas: bytes/GPU

    @classmethod
    def of(cls, host: GpuHost, running: Sequence[Placement], cap: float) -> _Ledger:
        gpus = {g.index: g for g in host.gpus}
        left = {g.index: float(min(g.free_bytes, cap * g.total_bytes)) for g in host.gpus}
        engines = dict.fromkeys(gpus, 0)
        for placement in running:
            for index in placement.gpus:
                if index in gpus:
                    left[index] -= (placement.memory_fraction or 0.0) * gpus[index].total_bytes
                    engines[index] += 1
        return cls(gpus, left, engines)

    def release(self, placement: Placement) -> None:
        for index in placement.gpus:
            if index in self.gpus:
                held = (placement.memory_fraction or 0.0) * self.gpus[index].total_bytes
                self.left[index] += held
                self.engines[index] -= 1

    def need(self, spec: EngineSpec, index: int) -> float:
        if spec.fraction is not None:
            return spec.fraction * self.gpus[index].total_bytes
        return float(spec.memory_bytes)

    def windows(self, width: int) -> list[tuple[int, ...]]:
        """Contiguous runs of ``width`` GPUs inside one island / NUMA node (any run when
        no group is wide enough)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for gpu in sorted(self.gpus.values(), key=lambda g: g.index):
            groups.setdefault(gpu.group, []).append(gpu.index)
        runs = [
            tuple(members[i : i + width])
            for members in groups.values()
            for i in range(len(members) - width + 1)
        ]
        if not runs:
            ordered = sorted(self.gpus)
            runs = [tuple(ordered[i : i + width]) for i in range(len(ordered) - width + 1)]
        return runs

    def fits(self, spec: EngineSpec, window: tuple[int, ...]) -> bool:
        return all(i in self.gpus and self.left[i] >= self.need(spec, i) for i in window)

    def take(self, spec: EngineSpec, key: ReplicaKey, window: tuple[int, ...]) -> Placement:
        for index in window:
            self.left[index] -= self.need(spec, index)
            self.engines[index] += 1
        self.needs[key] = float(spec.memory_bytes)
        return Placement(key, gpus=window, memory_fraction=spec.fraction,
                         explicit=bool(spec.gpus))  # fmt: skip

    def place(self, spec: EngineSpec, index: int) -> Placement:
        key = ReplicaKey(spec.version.model, spec.version.version, index)
        width = spec.tensor_parallel
        if spec.gpus:
            if len(spec.gpus) < width:
                raise PlacementRefused(
                    f"{spec.version}: gpus {list(spec.gpus)} are fewer than its tensor"
                    f" parallel size {width}"
                )
            start = (index * width) % len(spec.gpus)
            window = tuple((spec.gpus * 2)[start : start + width])
            unknown = [i for i in window if i not in self.gpus]
            if unknown:
                raise PlacementRefused(
                    f"{spec.version}: gpus {unknown} are not on this host"
                    f" (it has {core_list(sorted(self.gpus)) or 'none'})"
                )
            if not self.fits(spec, window):
                raise PlacementRefused(self.refusal(spec, [window]))
            return self.take(spec, key, window)
        if not self.gpus:
            raise PlacementRefused(
                f"{spec.version}: no GPUs were found on this CUDA host (install nvidia-ml-py"
                " so NVML can list them, or set engines.host = 'cpu')"
            )
        if width > len(self.gpus):
            raise PlacementRefused(
                f"{spec.version}: tensor parallel size {width} needs {width} GPUs; this"
                f" host has {len(self.gpus)}"
            )
        fitting = [w for w in self.windows(width) if self.fits(spec, w)]
        if not fitting:
            raise PlacementRefused(self.refusal(spec, self.windows(width)))
        best = min(
            fitting, key=lambda w: (max(self.engines[i] for i in w), -min(self.left[i] for i in w))
        )
        return self.take(spec, key, best)

    def refusal(self, spec: EngineSpec, windows: list[tuple[int, ...]]) -> str:
        shown = sorted({i for w in windows for i in w})
        free = ", ".join(
            f"GPU {i} {gib(max(self.left[i], 0))} of {gib(self.gpus[i].total_bytes)}" for i in shown
        )
        need = gib(self.need(spec, shown[0])) if shown else gib(spec.memory_bytes)
        return (
            f"{spec.version} does not fit: a replica needs {need} on each of"
            f" {spec.tensor_parallel} GPU(s); free for engines: {free or 'no GPUs'}"
        )

    def claim(self, placement: Placement) -> Placement:
        """A replica placed alone takes what is left on its GPUs now (a swap step)."""
        if placement.memory_fraction is not None:
            return placement
        spare = min(max(self.left[i], 0.0) for i in placement.gpus)
        fractions = []
        for index in placement.gpus:
            self.left[index] -= spare
            total = self.gpus[index].total_bytes
            fractions.append((self.needs[placement.replica] + spare) / total)
        fraction = math.floor(min(fractions) * 1000) / 1000
        return dataclasses.replace(placement, memory_fraction=fraction)

    def fractions(self, placed: list[Placement]) -> list[Placement]:
        """Each new engine's fraction: its need plus its share of what is left on its
        GPUs (shared by need), as a share of the GPU's total, rounded down to 0.001."""
        on: dict[int, list[Placement]] = {}
        for placement in placed:
            if placement.memory_fraction is None:
                for index in placement.gpus:
                    on.setdefault(index, []).append(placement)
        done = []
        for placement in placed:
            if placement.memory_fraction is not None:
                done.append(placement)
                continue
            shares = []
            for index in placement.gpus:
                sharing = sum(self.needs[p.replica] for p in on[index])
                need = self.needs[placement.replica]
                spare = max(self.left[index], 0.0)
                part = need / sharing if sharing > 0 else 1 / len(on[index])
                shares.append((need + spare * part) / self.gpus[index].total_bytes)
            fraction = math.floor(min(shares) * 1000) / 1000
            done.append(dataclasses.replace(placement, memory_fraction=fraction))
        return done


def plan(
    host: GpuHost,
    specs: Sequence[EngineSpec],
    *,
    running: Sequence[Placement] = (),
    cap: float = CAP,
    first_index: int = 0,
) -> tuple[Placement, ...]:
    """Every replica of ``specs`` on GPUs beside ``running``; ``PlacementRefused`` if not."""
    ledger = _Ledger.of(host, running, cap)
    placed = _place_all(ledger, specs, first_index)
    return tuple(ledger.fractions(placed))


def _place_all(ledger: _Ledger, specs: Sequence[EngineSpec], first: int) -> list[Placement]:
    # explicit devices first, then the widest and biggest (first fit decreasing)
    order = sorted(
        specs, key=lambda s: (not s.gpus, -s.tensor_parallel, -(s.fraction or 0), -s.memory_bytes)
    )
    placed: list[Placement] = []
    for spec in order:
        placed += [ledger.place(spec, first + i) for i in range(spec.replicas)]
    keyed = {p.replica: p for p in placed}
    return [
        keyed[ReplicaKey(s.version.model, s.version.version, first + i)]
        for s in specs
        for i in range(s.replicas)
    ]


def deploy(
    host: GpuHost,
    spec: EngineSpec,
    running: Sequence[Placement],
    old: Sequence[Placement],
    *,
    cap: float = CAP,
) -> DeployPlan:
    """Where a new version's replicas go: beside what runs, else a rolling swap over
    ``old`` (the replicas of the version it replaces), else ``PlacementRefused``.

    A rolling swap stops old replicas one at a time, each just before a new replica
    starts on what it freed; old replicas are stopped only while another old or new
    replica still serves (never zero), so a version with one replica on a full GPU is
    refused."""
    try:
        return DeployPlan("beside", plan(host, [spec], running=running, cap=cap))
    except PlacementRefused as beside:
        refused = str(beside)
    ledger = _Ledger.of(host, running, cap)
    left_old = sorted(old, key=lambda p: -p.replica.index)
    steps: list[SwapStep] = []
    placed: list[Placement] = []
    one = EngineSpec(spec.version, 1, spec.tensor_parallel, spec.memory_bytes, spec.fraction,
                     spec.gpus, spec.cpus)  # fmt: skip
    for index in range(spec.replicas):
        stopped: list[ReplicaKey] = []
        while True:
            try:
                placement = ledger.place(one, index)
                break
            except PlacementRefused:
                serving = len(left_old) + len(placed)
                if not left_old or serving <= 1:
                    raise PlacementRefused(
                        f"{refused}. A rolling swap cannot make room either: it would stop"
                        f" every replica of the running version ({len(old)}) before a new one"
                        " serves; give the version fewer GPUs' worth of memory, or more"
                        " replicas to the running one first"
                    ) from None
                gone = left_old.pop(0)
                ledger.release(gone)
                stopped.append(gone.replica)
        placement = ledger.claim(placement)  # what is free now, not what frees up later
        placed.append(placement)
        steps.append(SwapStep(tuple(stopped), (placement,)))
    return DeployPlan("rolling_swap", tuple(placed), tuple(steps), note=refused)
