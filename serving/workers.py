"""A gateway worker beside a supervisor: the engines come from the board, not from us.

When ``engines.board`` is set the gateway starts no engine. Its fleet is built from the
remote versions only (URLs, DNS); the local ones are whatever ``weir engines`` publishes
on the board, joined as remote replicas (``models.engines.board.BoardFollower``). Until
they appear, the versions the configuration runs count as not ready (``/readyz`` 503).
The engines' KV event endpoints come from the board as well: the worker's KV index
subscribes to them as to those of engines it starts itself.
"""

from __future__ import annotations

from pathlib import Path

from models.config import ModelConfig, VersionConfig
from models.engines.board import BoardFollower
from models.engines.engine_host import is_local, without_local
from models.engines.fleet import Fleet
from models.engines.launcher import ReplicaFactory
from models.registry import Registry
from models.types import VersionKey
from serving.routing.dispatch import Dispatcher


def fleet_models(models: list[ModelConfig], board: Path | None) -> list[ModelConfig]:
    """What this process builds its own fleet from."""
    return models if board is None else without_local(models)


def follow_board(
    board: Path,
    fleet: Fleet,
    registry: Registry,
    dispatcher: Dispatcher,
    factory: ReplicaFactory,
) -> BoardFollower:
    """The follower that keeps ``fleet``'s local versions equal to the board's."""

    def lookup(key: VersionKey) -> tuple[ModelConfig, VersionConfig] | None:
        model = registry.model(key.model)
        if model is None:
            return None
        version = next((v for v in model.versions if v.version == key.version), None)
        return (model, version) if version is not None and is_local(version) else None

    fleet.expected = {
        VersionKey(m.name, v.version)
        for m in registry.models
        for v in m.versions
        if is_local(v) and v.version in m.running()
    }
    follower = BoardFollower(fleet, board, lookup, factory.remote, on_added=dispatcher.adopt)
    if dispatcher.kv is not None:
        dispatcher.kv.sources.append(follower.events_of)
    return follower
