"""Reads the host's devices for the planner: GPUs through NVML (``nvidia-ml-py``) or
``torch.cuda``, otherwise the cores this process may use and their NUMA nodes.

Called when the gateway starts its engines, never at import: NVML and torch are imported
here, only when the host is a CUDA host and only if installed. ``torch.cuda`` is the
fallback: it makes a CUDA context on each GPU in the gateway's process (a few hundred
MiB), so NVML is the one to install (``pip install nvidia-ml-py``).

GPU indices are physical (what ``CUDA_VISIBLE_DEVICES`` names): a gateway started with
``CUDA_VISIBLE_DEVICES=2,3`` places engines on GPUs 2 and 3 only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.engines.placement.types import CpuHost, Gpu, GpuHost, Host, parse_list

log = logging.getLogger("weir.placement")
NODES = Path("/sys/devices/system/node")
PCI = Path("/sys/bus/pci/devices")


def discover(kind: str, env: Mapping[str, str] | None = None) -> Host:
    """The host as the planner sees it: a ``GpuHost`` on a CUDA host (no GPUs if neither
    NVML nor torch can see any), else a ``CpuHost``."""
    env = os.environ if env is None else env
    if kind != "cuda":
        return cpu_host()
    visible = _visible(env.get("CUDA_VISIBLE_DEVICES"))
    gpus = nvml_gpus(visible)
    if gpus is None:
        gpus = torch_gpus(visible)
    if not gpus:
        log.error("a CUDA host, but neither nvidia-ml-py nor torch.cuda sees a GPU")
    return GpuHost(tuple(gpus or ()))


def cpu_host(nodes: Path = NODES) -> CpuHost:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return CpuHost(cores, numa_of(cores, nodes))


def numa_of(cores: tuple[int, ...], nodes: Path = NODES) -> tuple[tuple[int, int], ...]:
    """(core, node) for each core, from ``/sys/devices/system/node/node*/cpulist``."""
    found: dict[int, int] = {}
    for entry in sorted(nodes.glob("node[0-9]*")) if nodes.is_dir() else []:
        try:
            members = parse_list((entry / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        node = int(entry.name.removeprefix("node"))
        found.update(dict.fromkeys(members, node))
    return tuple((core, found[core]) for core in cores if core in found)


def _visible(value: str | None) -> list[int] | None:
    """The physical GPUs ``CUDA_VISIBLE_DEVICES`` allows; ``None``: all (or UUIDs, which
    this does not map)."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def nvml_gpus(visible: list[int] | None, pynvml: Any = None) -> list[Gpu] | None:
    """The GPUs NVML sees (``None`` when nvidia-ml-py is not installed or NVML fails).

    ``pynvml``: the module (nvidia-ml-py's); tests pass a stand-in with the same calls."""
    if pynvml is None:
        if importlib.util.find_spec("pynvml") is None:
            return None
        pynvml = importlib.import_module("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.warning("NVML did not start (%s); trying torch.cuda", exc)
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = {
            i: pynvml.nvmlDeviceGetHandleByIndex(i)
            for i in range(count)
            if visible is None or i in visible
        }
        islands = _islands(pynvml, handles)
        gpus = []
        for index, handle in handles.items():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(index, int(memory.total), int(memory.free),
                            numa=_gpu_numa(pynvml, handle), island=islands.get(index)))  # fmt: skip
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("NVML failed reading the GPUs (%s); trying torch.cuda", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def _gpu_numa(pynvml: Any, handle: Any) -> int | None:
    try:
        bus = pynvml.nvmlDeviceGetPciInfo(handle).busId
    except pynvml.NVMLError:
        return None
    bus = bus.decode() if isinstance(bus, bytes) else str(bus)
    path = PCI / bus.lower()[-12:] / "numa_node"  # sysfs: 0000:3b:00.0
    try:
        node = int(path.read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _islands(pynvml: Any, handles: dict[int, Any]) -> dict[int, int]:
    """GPUs joined by NVLink (peer to peer over NVLink), numbered by their lowest index;
    empty when no two GPUs are."""
    parent = {i: i for i in handles}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    linked = False
    for a in handles:
        for b in handles:
            if a >= b:
                continue
            try:
                status = pynvml.nvmlDeviceGetP2PStatus(
                    handles[a], handles[b], pynvml.NVML_P2P_CAPS_INDEX_NVLINK
                )
            except pynvml.NVMLError:
                continue
            if status == pynvml.NVML_P2P_STATUS_OK:
                parent[root(b)] = root(a)
                linked = True
    return {i: root(i) for i in handles} if linked else {}


def torch_gpus(visible: list[int] | None) -> list[Gpu]:
    """The GPUs torch.cuda sees (indices mapped back through CUDA_VISIBLE_DEVICES)."""
    if importlib.util.find_spec("torch") is None:
        return []
    torch: Any = importlib.import_module("torch")

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        physical = visible[i] if visible is not None and i < len(visible) else i
        gpus.append(Gpu(physical, int(total), int(free)))
    return gpus
