"""Budgets and the ledger at the gateway (fake engine, in-process limits, SQLite ledger):
429 budget_exceeded through the error table, one ledger row per request (streamed and
left ones too), and /weir/admin/usage totals equal to tokens_used_total."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.billing.config import BillingConfig, BudgetConfig, PriceConfig
from serving.http.app import create_app
from serving.ledger.config import LedgerConfig
from serving.limits.limiter import Limiter
from serving.settings import KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.windows import hold_limit_window

ADMIN = "admin-secret-for-usage-tests"
CHAT: dict[str, Any] = {
    "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
}  # fmt: skip
# $1 per million prompt tokens, $2 per million completion: 1,000 and 2,000 nano-dollars
PRICE = PriceConfig(model="smollm2", prompt_per_m=1.0, completion_per_m=2.0)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    engine = FakeEngine()

    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        return Fleet([replica], health_interval_s=0.05)

    settings = Settings(
        keys=KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN)),
        billing=BillingConfig(prices=[PRICE], teams={"ops": BudgetConfig(day=0.0001)}),
        ledger=LedgerConfig(
            path=tmp_path / "ledger.db", spill_dir=tmp_path / "spill", flush_interval_s=0.05
        ),
    )
    app = create_app(settings, fleet_factory=fleet, counters={})
    with TestClient(app, raise_server_exceptions=False) as made:
        hold_limit_window(made.app)
        yield made


def new_key(client: TestClient, **fields: Any) -> str:
    answer = client.post(
        "/weir/admin/keys",
        json={"name": "t", **fields},
        headers={"authorization": f"Bearer {ADMIN}"},
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["key"])


def settle(client: TestClient) -> None:
    limiter: Limiter = client.app.state.limiter  # type: ignore[attr-defined]
    client.portal.call(limiter.drain)  # type: ignore[union-attr]


def test_team_budget_refuses_with_429_budget_exceeded_and_the_numbers(client: TestClient) -> None:
    # no tokenizer here: the prompt counts 0 at admission, the worst case is 20 x 2,000
    secret = new_key(client, tenant="ops")
    auth = {"authorization": f"Bearer {secret}"}
    spent = 0
    while True:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=auth)
        if answer.status_code != 200:
            break
        usage = answer.json()["usage"]
        spent += usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000
        settle(client)
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert answer.headers["x-weir-budget"] == "team:day"
    assert answer.headers["x-weir-budget-needed-usd"] == "0.000040000"
    left = 100_000 - spent
    assert answer.headers["x-weir-budget-remaining-usd"] == f"0.{left:09d}"
    assert left < 40_000 <= left + 11_000  # refused only when the worst case does not fit
    assert "team's daily budget is $0.000100000" in error["message"]
    # counted by budget, apart from the rate limits' refusals
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 429
    own = new_key(client, budget_total=0.00001)  # $0.00001: less than one worst case
    mine = client.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {own}"}
    )
    assert mine.status_code == 429
    assert mine.headers["x-weir-budget"] == "key:total"
    metrics = client.get("/metrics").text
    assert _sample(metrics, 'weir_budget_rejections_total{budget="team:day"}') == 2
    assert _sample(metrics, 'weir_budget_rejections_total{budget="key:total"}') == 1
    assert "weir_ratelimit_rejections_total{" not in metrics
    assert (
        _sample(
            metrics,
            'model_errors_total{error_type="budget_exceeded",model="smollm2",'
            'model_version="135m-instruct"}',
        )
        == 3
    )


def test_every_request_has_a_ledger_row_and_usage_matches_the_metrics(
    client: TestClient,
) -> None:
    secret = new_key(client, budget_day=10.0)
    auth = {"authorization": f"Bearer {secret}"}
    for body in (CHAT, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}):
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    bad = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth)
    assert bad.status_code == 404
    report = client.get(
        "/weir/admin/usage?by=model&since=1h", headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert report.status_code == 200, report.text
    total = report.json()["total"]
    metrics = client.get("/metrics").text
    prompt = _sample(
        metrics, 'tokens_used_total{model="smollm2",model_version="135m-instruct",type="prompt"}'
    )
    completion = _sample(
        metrics,
        'tokens_used_total{model="smollm2",model_version="135m-instruct",type="completion"}',
    )
    assert (total["prompt_tokens"], total["completion_tokens"]) == (prompt, completion)
    assert total["requests"] == 7  # the refused one too, under model "unknown", at $0
    lines = {line["group"]: line["requests"] for line in report.json()["lines"]}
    assert lines == {"smollm2": 6, "unknown": 1}
    assert total["cost_nano"] == prompt * 1000 + completion * 2000
    csv = client.get(
        "/weir/admin/usage?format=csv&by=version", headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert csv.text.splitlines()[1].startswith("smollm2@135m-instruct,6,")
    bad_since = client.get(
        "/weir/admin/usage?since=soon", headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert bad_since.status_code == 400
    assert bad_since.json()["error"]["param"] == "since"


def _sample(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[-1]))
    raise AssertionError(f"{name} not in /metrics")
