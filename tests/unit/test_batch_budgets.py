"""A batch line refused for money is answered, not retried: a total budget never resets,
so retrying a 429 budget_exceeded would hold the batch until its 24 h window ran out."""

from __future__ import annotations

import io
import time
from pathlib import Path

import openai
import orjson
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.billing.config import BillingConfig, PriceConfig
from serving.http.app import create_app
from serving.ledger.config import LedgerConfig
from serving.settings import BatchesConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine

ADMIN = "admin-secret-for-batch-budgets"
PRICE = PriceConfig(model="smollm2", prompt_per_m=1.0, completion_per_m=2.0)


def test_a_line_over_a_total_budget_gets_its_429_and_the_batch_completes(
    tmp_path: Path,
) -> None:
    engine = FakeEngine()

    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        return Fleet([replica], health_interval_s=0.05)

    settings = Settings(
        keys=KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN)),
        billing=BillingConfig(prices=[PRICE]),
        ledger=LedgerConfig(path=tmp_path / "ledger.db", spill_dir=tmp_path / "spill"),
        batches=BatchesConfig(sqlite_path=tmp_path / "batches.sqlite3", poll_s=0.05),
    )
    app = create_app(settings, fleet_factory=fleet, counters={})
    with TestClient(app, raise_server_exceptions=False) as client:
        made = client.post(
            "/weir/admin/keys",
            json={"name": "poor", "budget_total": 0.00001},  # less than one worst case
            headers={"authorization": f"Bearer {ADMIN}"},
        )
        assert made.status_code == 200, made.text
        api = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=made.json()["key"],
                            http_client=client, max_retries=0)  # fmt: skip
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 20}  # fmt: skip
        lines = [{"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                  "body": body} for n in range(3)]  # fmt: skip
        raw = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
        batch = api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 15
        while (batch := api.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("validating", "in_progress", "finalizing"), batch
            assert time.monotonic() < deadline, f"still {batch.status}: a refusal is retried"
            time.sleep(0.05)
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 3)
        assert batch.error_file_id is not None
        errors = [
            orjson.loads(x) for x in api.files.content(batch.error_file_id).read().splitlines()
        ]
        assert sorted(e["custom_id"] for e in errors) == ["r0", "r1", "r2"]
        for line in errors:
            assert line["response"]["status_code"] == 429
            assert line["response"]["body"]["error"]["code"] == "budget_exceeded"
        assert engine.calls == []
