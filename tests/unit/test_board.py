"""The fleet board between ``weir engines`` and the gateway workers: what a worker sees of
an engine the supervisor restarted."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import EngineConfig, ModelConfig, VersionConfig
from models.engines.client import EngineTimeouts
from models.engines.fleet import Fleet
from models.engines.launcher import ReplicaFactory
from models.registry import Registry
from serving import workers
from serving.routing.dispatch import Deadlines, Dispatcher
from tests.unit.test_kv_routing_fleet import supervisor

pytestmark = pytest.mark.anyio


async def test_a_worker_counts_the_restarts_of_the_supervisors_engine(tmp_path: Path) -> None:
    models = [ModelConfig(name="chat", task="chat", current="v1",
                          versions=[VersionConfig(version="v1", weights="w")])]  # fmt: skip
    host = supervisor(tmp_path, models)
    local = host.fleet.replicas[0]
    assert local.process is not None
    local.healthy = True
    host.publish()
    fleet = Fleet([])
    dispatcher = Dispatcher(fleet, models, Deadlines(5.0, 30.0))
    factory = ReplicaFactory(EngineConfig(), EngineTimeouts())
    follower = workers.follow_board(tmp_path / "board.json", fleet, Registry(models),
                                    dispatcher, factory)  # fmt: skip
    try:
        await follower.refresh()
        [theirs] = fleet.replicas
        assert theirs.process is None  # a remote engine to this worker
        assert theirs.restarts == 0
        local.process.restarts = 2  # killed twice, started again on its port each time
        host.publish()
        await follower.refresh()
        assert fleet.replicas == [theirs]  # the same engine, not a new replica
        assert theirs.restarts == 2  # what /weir/engines reports
    finally:
        await follower.stop()
        await fleet.discard(list(fleet.replicas))
