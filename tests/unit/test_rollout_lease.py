"""One rollout per model across the fleet (issue 26): the lease in Redis.

Two gateways (in process, fake engines) share the rollout state in the session's real
redis-server (``deploy.redis_url``). While one deploys a model, the other's deploy or
rollback of it is a 409 ``deploy_in_progress`` that says the rollout runs elsewhere;
once the first has finished, and released the lease, the other deploys. A gateway that
died holding the lease holds it only until ``deploy.lease_s`` has run out. A gateway
configured differently from the configuration a rollout was made from (a ``helm upgrade``
since) serves its configuration.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis
from starlette.testclient import TestClient

from models.config import VersionConfig
from serving.rollout.shared import PREFIX, SharedState
from serving.settings import Settings
from tests.fakes.engine import FakeEngine
from tests.unit.test_rollout import ADMIN, client_for, settings, versions_served, wait_done

DEPLOY = "/weir/admin/models/smollm2/deploy"
ROLLBACK = "/weir/admin/models/smollm2/rollback"
STATUS = "/weir/admin/models/smollm2/deployment"
WARM_S = 1.0  # gateway A's deploy takes this long to warm v2: B asks meanwhile


def forget_rollouts(url: str) -> None:
    """No rollout state or lease left by an earlier test on the session's Redis."""
    with redis.Redis.from_url(url) as client:
        stale = list(client.scan_iter(match=PREFIX + "*"))
        if stale:
            client.delete(*stale)


def refused_elsewhere(answer: Any) -> None:
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "deploy_in_progress"
    assert error["param"] is None
    assert "A rollout of smollm2 is in progress through another gateway" in error["message"]


def status(client: TestClient) -> dict[str, Any]:
    found: dict[str, Any] = client.get(STATUS, headers=ADMIN).json()
    return found


def wait_for(client: TestClient, current: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while status(client)["current"] != current:
        assert time.monotonic() < deadline, status(client)
        time.sleep(0.02)


def test_a_deploy_through_another_gateway_waits_for_the_running_one(
    tmp_path: Path, redis_url: str
) -> None:
    forget_rollouts(redis_url)
    config = settings(tmp_path, redis_url=redis_url)
    slow_warm = {"smollm2@v2#0": FakeEngine(name="smollm2@v2#0", hang_s=WARM_S)}
    with client_for(config, slow_warm) as a, client_for(config, {}) as b:
        started = a.post(DEPLOY, headers=ADMIN, json={"version": "v2"})
        assert started.status_code == 202, started.text
        refused_elsewhere(b.post(DEPLOY, headers=ADMIN, json={"version": "v2"}))
        refused_elsewhere(b.post(ROLLBACK, headers=ADMIN))
        assert status(b)["current"] == "v1"  # the refusals changed nothing
        done = wait_done(a)
        assert done["operation"]["phase"] == "done", done
        wait_for(b, "v2")  # b followed a's rollout
        # a's rollout ended and gave the lease back: b may deploy now
        back = b.post(DEPLOY, headers=ADMIN, json={"version": "v1"})
        assert back.status_code == 202, back.text
        assert wait_done(b)["current"] == "v1"
        wait_for(a, "v1")
    forget_rollouts(redis_url)


def test_the_lease_of_a_gateway_that_died_mid_rollout_runs_out(
    tmp_path: Path, redis_url: str
) -> None:
    forget_rollouts(redis_url)
    lease_s = 1.0

    async def die_holding_the_lease() -> None:  # what a gateway killed mid-deploy leaves
        dead = SharedState(redis_url, lease_s=lease_s)
        try:
            assert await dead.acquire("smollm2")
        finally:
            await dead.aclose()

    with client_for(settings(tmp_path, redis_url=redis_url), {}) as b:
        asyncio.run(die_holding_the_lease())
        taken = time.monotonic()
        refused_elsewhere(b.post(DEPLOY, headers=ADMIN, json={"version": "v2"}))
        assert time.monotonic() - taken < lease_s  # refused while the lease was live
        time.sleep(max(0.0, taken + lease_s + 0.1 - time.monotonic()))
        answer = b.post(DEPLOY, headers=ADMIN, json={"version": "v2"})
        assert answer.status_code == 202, answer.text
        assert wait_done(b)["current"] == "v2"
    forget_rollouts(redis_url)


def upgraded(config: Settings) -> Settings:
    """The configuration after a ``helm upgrade`` that added v3 and made it current."""
    chat = config.models[0]
    versions = [v.model_copy(update={"standby": True}) for v in chat.versions]
    versions.append(VersionConfig(version="v3", url="http://unused-3"))
    models = [chat.model_copy(update={"versions": versions, "current": "v3"}), *config.models[1:]]
    return config.model_copy(update={"models": models})


def test_a_changed_configuration_wins_over_an_older_runtime_rollout(
    tmp_path: Path, redis_url: str
) -> None:
    forget_rollouts(redis_url)
    config = settings(tmp_path, redis_url=redis_url)
    with client_for(config, {}) as a:
        assert a.post(DEPLOY, headers=ADMIN, json={"version": "v2"}).status_code == 202
        assert wait_done(a)["current"] == "v2"  # the shared state says v2 now
        with client_for(config, {}) as same:
            assert status(same)["current"] == "v2"  # same configuration: joins the rollout
        with client_for(upgraded(config), {}) as c:
            assert status(c)["current"] == "v3"  # its configuration changed since: it wins
            assert versions_served(c, 3) == {"v3": 3}
            # a rollout made from the old configuration does not move it either
            assert a.post(ROLLBACK, headers=ADMIN).status_code == 202
            assert wait_done(a)["current"] == "v1"
            time.sleep(0.5)  # five follow intervals
            assert status(c)["current"] == "v3"
            assert versions_served(c, 3) == {"v3": 3}
    forget_rollouts(redis_url)
