"""What placement works with: the host's devices, the engines asked for, where each went.

Plain frozen dataclasses; the planner (``gpu``, ``cpu``, ``plan``) is pure functions of
these, and ``discover`` is the one module that reads the real host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.errors import ConfigError
from models.types import ReplicaKey, VersionKey

GIB = 1024**3


class PlacementRefused(ConfigError):
    """The engines asked for do not fit on the host; the message has the numbers."""


@dataclass(frozen=True)
class Gpu:
    index: int  # the physical index, as CUDA_VISIBLE_DEVICES names it
    total_bytes: int
    free_bytes: int  # free when the host was read, before any engine of ours started
    numa: int | None = None  # the NUMA node the GPU hangs off, where known
    island: int | None = None  # GPUs joined by NVLink share an island number

    @property
    def group(self) -> tuple[int, int]:
        """GPUs of one tensor-parallel engine stay within one group (island, else node)."""
        return (self.island if self.island is not None else -1,
                self.numa if self.numa is not None else -1)  # fmt: skip


@dataclass(frozen=True)
class GpuHost:
    gpus: tuple[Gpu, ...]
    kind: str = field(default="cuda", init=False)


@dataclass(frozen=True)
class CpuHost:
    cores: tuple[int, ...]  # the cores this process may use (its affinity)
    numa: tuple[tuple[int, int], ...] = ()  # (core, node) pairs; empty: one node
    kind: str = field(default="cpu", init=False)

    def node_of(self, core: int) -> int:
        return dict(self.numa).get(core, 0)


Host = GpuHost | CpuHost


@dataclass(frozen=True)
class EngineSpec:
    """One version's engines as asked: how many, how wide, how much memory each needs."""

    version: VersionKey
    replicas: int = 1
    tensor_parallel: int = 1
    memory_bytes: int = 0  # per GPU of one replica: its share of weights + KV budget + overhead
    fraction: float | None = None  # the version's own --gpu-memory-utilization, if it set one
    gpus: tuple[int, ...] = ()  # explicit GPUs (replica i takes the i-th run of TP of them)
    cpus: tuple[int, ...] = ()  # explicit cores (split between the replicas)


@dataclass(frozen=True)
class Placement:
    """Where one replica runs.

    GPU hosts: ``gpus`` (its CUDA_VISIBLE_DEVICES) and ``memory_fraction`` (its
    ``--gpu-memory-utilization``: the share of each GPU's total memory it may take).
    CPU hosts: ``cpus`` (the cores its processes may run on) and ``omp`` (the cores its
    OpenMP threads bind to, one tuple per tensor-parallel rank:
    ``VLLM_CPU_OMP_THREADS_BIND``).
    """

    replica: ReplicaKey
    gpus: tuple[int, ...] = ()
    memory_fraction: float | None = None
    cpus: tuple[int, ...] = ()
    omp: tuple[tuple[int, ...], ...] = ()
    explicit: bool = False  # the version named its devices itself

    @property
    def omp_cores(self) -> set[int]:
        return {core for rank in self.omp for core in rank}

    @property
    def omp_bind(self) -> str:
        """``VLLM_CPU_OMP_THREADS_BIND``'s form: ranks split by ``|``, e.g. ``0-2|3-5``."""
        return "|".join(core_list(rank) for rank in self.omp)

    def view(self) -> dict[str, Any]:
        return {
            "replica": str(self.replica),
            "gpus": list(self.gpus),
            "memory_fraction": self.memory_fraction,
            "cpus": list(self.cpus),
            "omp_threads_bind": self.omp_bind or None,
            "explicit": self.explicit,
        }


@dataclass(frozen=True)
class SwapStep:
    """One step of a rolling swap: stop ``stop`` (old replicas, maybe none), then start
    ``start`` on what they freed."""

    stop: tuple[ReplicaKey, ...]
    start: tuple[Placement, ...]


@dataclass(frozen=True)
class DeployPlan:
    """Where a new version goes: ``beside`` the running ones, or by a ``rolling_swap``."""

    kind: str  # beside | rolling_swap
    placements: tuple[Placement, ...]
    steps: tuple[SwapStep, ...] = ()
    note: str = ""

    def describe(self) -> str:
        if self.kind == "beside":
            return "; ".join(describe(p) for p in self.placements)
        lines = [
            "".join(f"stop {key}, " for key in step.stop)
            + "start "
            + ", ".join(describe(p) for p in step.start)
            for step in self.steps
        ]
        return "; then ".join(lines)


def describe(placement: Placement) -> str:
    if placement.gpus:
        return (f"{placement.replica} on GPU {core_list(placement.gpus)}"
                f" at {placement.memory_fraction:g}")  # fmt: skip
    if placement.cpus:
        return f"{placement.replica} on cores {core_list(placement.cpus)}"
    return f"{placement.replica} anywhere"


def core_list(ids: tuple[int, ...] | list[int]) -> str:
    """``0-3,6`` for (0, 1, 2, 3, 6): Linux's list form, as taskset and vLLM read it."""
    ordered = sorted(set(ids))
    runs: list[str] = []
    start = prev = None
    for value in [*ordered, None]:
        if value is not None and prev is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = value
    return ",".join(runs)


def parse_list(text: str) -> tuple[int, ...]:
    """Linux's list form back to ids: ``0-3,6`` -> (0, 1, 2, 3, 6)."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        ids += range(int(low), int(high or low) + 1)
    return tuple(ids)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
