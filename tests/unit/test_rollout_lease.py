"""One rollout per model across the fleet (issue 26): the lease in Redis.

Two gateways (in process, fake engines) share the rollout state in the session's real
redis-server (``deploy.redis_url``). While one deploys a model, the other's deploy or
rollback of it is a 409 ``deploy_in_progress`` that says the rollout runs elsewhere;
once the first has finished, and released the lease, the other deploys. A gateway that
died holding the lease holds it only until ``deploy.lease_s`` has run out.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis
from starlette.testclient import TestClient

from serving.rollout.shared import PREFIX, SharedState
from tests.fakes.engine import FakeEngine
from tests.unit.test_rollout import ADMIN, client_for, settings, wait_done

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
