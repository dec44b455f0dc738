"""Builds the fleet from configuration: one replica per configured engine.

Local versions get a vLLM process per replica on a free loopback port; versions with a
``url`` are remote engines that are health-checked but never started or stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path

import aiohttp

from models import vllm_engine
from models.backoff import ExponentialBackoff
from models.config import EngineConfig, ModelConfig, StoreConfig
from models.engine_client import EngineTimeouts, HttpEngine
from models.fleet import Fleet, Replica
from models.store import ModelStore
from models.supervisor import EngineProcess
from models.tokenizer import TokenCounter
from models.types import ReplicaKey

log = logging.getLogger("weir.launcher")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def check_weights(models: list[ModelConfig], store: StoreConfig) -> dict[str, Path]:
    """Resolve (and verify, if configured) every local version's weights before start.

    Raises ``ModelNotInStore`` (whose message says ``weir models pull NAME``),
    ``VerificationFailed`` or ``StoreError``.
    """
    model_store = ModelStore(store.root)
    resolved: dict[str, Path] = {}
    for model in models:
        for version in model.versions:
            if version.weights is None:
                continue
            path = model_store.resolve(version.weights)
            if store.verify_on_start and model_store.has(version.weights):
                model_store.verify(version.weights)
            resolved[f"{model.name}@{version.version}"] = path
    return resolved


def load_counters(
    models: list[ModelConfig], weights: dict[str, Path], store: StoreConfig
) -> dict[str, TokenCounter]:
    """A token counter per version: from its weights, or its ``tokenizer`` for remote ones.

    A remote version without ``tokenizer`` gets none: its prompts are not counted.
    """
    model_store = ModelStore(store.root)
    counters: dict[str, TokenCounter] = {}
    for model in models:
        for version in model.versions:
            key = f"{model.name}@{version.version}"
            if key in weights:
                directory = weights[key]
            elif version.tokenizer is not None:
                directory = model_store.resolve(version.tokenizer)
            else:
                log.warning("%s: no tokenizer configured; prompts are not counted", key)
                continue
            counters[key] = TokenCounter.from_dir(directory, version.engine_args)
    return counters


def build_fleet(
    models: list[ModelConfig],
    weights: dict[str, Path],
    engines: EngineConfig,
    session: aiohttp.ClientSession,
    timeouts: EngineTimeouts,
) -> Fleet:
    host = vllm_engine.host_kind()
    backoff = ExponentialBackoff(engines.restart_backoff_base_s, engines.restart_backoff_cap_s)
    log_dir = engines.log_dir.expanduser()
    replicas: list[Replica] = []
    for model in models:
        own = model.timeouts
        model_timeouts = dataclasses.replace(
            timeouts,
            connect_s=own.connect_s or timeouts.connect_s,
            idle_s=own.idle_s or timeouts.idle_s,
            total_s=own.total_s or timeouts.total_s,
        )
        for version in model.versions:
            served_name = version.served_name or model.name
            remote = version.remote
            for index in range(version.replica_count):
                key = ReplicaKey(model.name, version.version, index)
                if remote:
                    engine = HttpEngine(str(key), remote[index], session, model_timeouts)
                    replicas.append(Replica(key, engine, served_name))
                    continue
                port = free_port()
                cmd = vllm_engine.command(
                    weights=weights[f"{model.name}@{version.version}"],
                    served_name=served_name,
                    port=port,
                    task=model.task,
                    config=engines,
                    extra_args=version.engine_args,
                    host=host,
                )
                process = EngineProcess(
                    str(key),
                    cmd,
                    env=vllm_engine.environment(engines, version.env, host),
                    log_path=log_dir / f"{model.name}@{version.version}-{index}.log",
                    grace_s=engines.stop_grace_s,
                    backoff=backoff,
                )
                engine = HttpEngine(str(key), f"http://127.0.0.1:{port}", session, model_timeouts)
                replicas.append(Replica(key, engine, served_name, process))
    log.info("fleet on a %s host: %d replicas", host, len(replicas))
    return Fleet(
        replicas,
        health_interval_s=engines.health_interval_s,
        start_timeout_s=engines.start_timeout_s,
        unhealthy_after=engines.unhealthy_after,
    )
