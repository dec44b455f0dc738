"""CPU placement: the cores each engine replica's processes run on, and where its OpenMP
threads bind.

vLLM-CPU binds one OpenMP thread per core and those threads spin: two engines bound to
the same core starve each other (vLLM's own binding puts every engine on the first
cores). So every engine gets its own share of the host's cores: ``len(cores) // (engines
+ 1)`` contiguous cores on one NUMA node where it can, the spare share left for the
gateway and for the next deploy (``len(cores) // engines`` when the host has too few
cores). Within a share of two or more cores the last one is left out of the OpenMP
binding for the engine's scheduler and HTTP server, as vLLM's automatic binding does.

A deploy adds its replicas where the running engines weigh least (a spinning OpenMP core
counts twice, the rest of a share once, the version being replaced a little more; free
cores down to half a share beat a full share on busy ones), so
the new version starts beside the old one on cores of its own; the old version's cores
return to the pool when it stops, for the next deploy (a running engine keeps the
binding it started with: its threads are bound once). A version's own ``cpus`` win: its
replicas split them and bind OpenMP to all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.engines.placement.types import (
    CpuHost,
    EngineSpec,
    Placement,
    PlacementRefused,
    core_list,
)
from models.types import ReplicaKey, VersionKey

OMP_WEIGHT = 2.0  # a core where some engine's OpenMP threads spin
SHARE_WEIGHT = 1.0  # a core of some engine's share that its threads do not spin on
REPLACED_WEIGHT = 0.5  # a little extra: the version being replaced is the busy one


def plan(
    host: CpuHost,
    specs: Sequence[EngineSpec],
    *,
    running: Sequence[Placement] = (),
    replacing: VersionKey | None = None,
    first_index: int = 0,
    headroom: bool = True,
) -> tuple[Placement, ...]:
    """Every replica of ``specs`` on cores beside ``running``; ``PlacementRefused`` for
    cores that are not there or a tensor-parallel size wider than the host.

    ``headroom`` (the plan at start): one share more than there are engines is cut, and
    the spare one is left free, when the host has the cores: the gateway runs there, and
    a deploy's new version starts there without touching the running engines' cores."""
    load = dict.fromkeys(host.cores, 0.0)
    for placement in running:
        spinning = {c for rank in placement.omp for c in rank}
        extra = REPLACED_WEIGHT if placement.replica.version_key == replacing else 0.0
        for core in placement.cpus:
            if core in load:
                load[core] += (OMP_WEIGHT if core in spinning else SHARE_WEIGHT) + extra
    claimed: set[int] = set()
    placed: dict[ReplicaKey, Placement] = {}
    for spec in specs:
        if spec.cpus:
            for placement in _explicit(host, spec, first_index):
                placed[placement.replica] = placement
                claimed.update(placement.cpus)
    pool = [c for c in host.cores if c not in claimed] or list(host.cores)
    pool.sort(key=lambda c: (host.node_of(c), c))
    planned = [s for s in specs if not s.cpus]
    engines = len([p for p in running if not p.explicit]) + sum(s.replicas for s in planned)
    shares = engines + 1 if headroom and len(pool) > engines else max(engines, 1)
    share = max(1, len(pool) // shares)
    for spec in planned:
        if spec.tensor_parallel > len(pool):
            raise PlacementRefused(
                f"{spec.version}: tensor parallel size {spec.tensor_parallel} needs"
                f" {spec.tensor_parallel} cores; {len(pool)} are free for engines"
                f" ({core_list(pool)})"
            )
        width = max(share, spec.tensor_parallel)
        narrowest = max(spec.tensor_parallel, (width + 1) // 2)
        for i in range(spec.replicas):
            key = ReplicaKey(spec.version.model, spec.version.version, first_index + i)
            # the least loaded run; a narrower one (down to half a share) of free cores
            # beats sharing cores with a running engine
            window = min(
                (w for n in range(width, narrowest - 1, -1) for w in _windows(host, pool, n)),
                key=lambda w: (sum(load[c] for c in w), -len(w)),
            )
            placement = _bound(key, window, spec.tensor_parallel, explicit=False)
            for core in window:
                load[core] += OMP_WEIGHT if core in placement.omp_cores else SHARE_WEIGHT
            placed[key] = placement
    return tuple(
        placed[ReplicaKey(s.version.model, s.version.version, first_index + i)]
        for s in specs
        for i in range(s.replicas)
    )


def _explicit(host: CpuHost, spec: EngineSpec, first: int) -> list[Placement]:
    unknown = sorted(set(spec.cpus) - set(host.cores))
    if unknown:
        raise PlacementRefused(
            f"{spec.version}: cpus {core_list(unknown)} are not among this host's cores"
            f" ({core_list(list(host.cores))})"
        )
    cores = sorted(set(spec.cpus))
    each = len(cores) // spec.replicas
    made = []
    for i in range(spec.replicas):
        key = ReplicaKey(spec.version.model, spec.version.version, first + i)
        own = tuple(cores[i * each : (i + 1) * each]) if each else tuple(cores)
        ranks = _split(own, spec.tensor_parallel)
        made.append(Placement(key, cpus=own, omp=ranks, explicit=True))
    return made


def _windows(host: CpuHost, pool: list[int], width: int) -> list[tuple[int, ...]]:
    """Runs of ``width`` cores of ``pool`` on one NUMA node (across nodes if none fits)."""
    nodes: dict[int, list[int]] = {}
    for core in pool:
        nodes.setdefault(host.node_of(core), []).append(core)
    runs = [
        tuple(cores[i : i + width])
        for cores in nodes.values()
        for i in range(len(cores) - width + 1)
    ]
    if not runs:
        runs = [tuple(pool[i : i + width]) for i in range(max(len(pool) - width + 1, 1))]
    return runs


def _split(cores: tuple[int, ...], ranks: int) -> tuple[tuple[int, ...], ...]:
    """``cores`` in ``ranks`` contiguous parts, the remainder to the last ones."""
    if len(cores) < ranks:
        return tuple(cores[r % len(cores) :][:1] for r in range(ranks))
    each, extra = divmod(len(cores), ranks)
    parts, start = [], 0
    for r in range(ranks):
        size = each + (1 if r >= ranks - extra else 0)
        parts.append(cores[start : start + size])
        start += size
    return tuple(parts)


def _bound(key: ReplicaKey, cores: tuple[int, ...], ranks: int, *, explicit: bool) -> Placement:
    """OpenMP on each rank's cores but the last (the scheduler's and server's) when it has
    two or more."""
    omp = tuple(part[:-1] if len(part) > 1 else part for part in _split(cores, ranks))
    return Placement(key, cpus=cores, omp=omp, explicit=explicit)
