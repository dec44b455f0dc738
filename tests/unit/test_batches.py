"""The Batch API in-process over fake engines, through the official ``openai`` client:
files.create, batches.create, batches.retrieve, files.content; the output and error files
(one line per input line), bad input files, tenants, cancel, the proxy path (priority in
the engine's body, metrics) and a restart that resumes without running a line twice.

Every Batch and file object is validated against OpenAI's spec.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import openai
import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from models.config import ModelConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.errors import BatchesUnavailable
from serving.http.app import create_app
from serving.settings import BatchesConfig, GatewayConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate

JSON = dict[str, Any]
ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}
CHAT: Final = "/v1/chat/completions"


def models() -> list[ModelConfig]:
    chat = VersionConfig(version="v1", url="http://chat.invalid",
                         engine_args=["--scheduling-policy", "priority"])  # fmt: skip
    embed = VersionConfig(version="v1", url="http://embed.invalid")
    return [
        ModelConfig(name="smollm2", task="chat", current="v1", versions=[chat]),
        ModelConfig(name="minilm", task="embed", current="v1", versions=[embed]),
    ]


def make_client(chat: FakeEngine, tmp_path: Path, **batches: Any) -> TestClient:
    settings = Settings(
        gateway=GatewayConfig(api_keys=[SecretStr("sk-alice"), SecretStr("sk-bob")]),
        batches=BatchesConfig(sqlite_path=tmp_path / "batches.sqlite3", **batches),
        models=models(),
    )
    embed = FakeEngine(name="embed")

    def fleet(_: object) -> Fleet:
        return Fleet(
            [Replica(ReplicaKey("smollm2", "v1", 0), chat, "smollm2"),
             Replica(ReplicaKey("minilm", "v1", 0), embed, "minilm")],
            health_interval_s=0.05,
        )  # fmt: skip

    app = create_app(settings, fleet_factory=fleet, counters={})
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(engine, tmp_path, poll_s=0.05, lease_s=1.0) as c:
        yield c


def sdk(client: TestClient, key: str = "sk-alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key,
                         http_client=client, max_retries=0)  # fmt: skip


def jsonl(rows: list[JSON]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def chat_line(n: int, **body: Any) -> JSON:
    request = {"model": "smollm2", "messages": [{"role": "user", "content": f"q{n}"}], **body}
    return {"custom_id": f"req-{n}", "method": "POST", "url": CHAT, "body": request}


def wait_for(client: openai.OpenAI, batch_id: str, *statuses: str, within_s: float = 30) -> Any:
    """Poll the batch until its status is one of ``statuses``."""
    deadline = time.monotonic() + within_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert batch.status not in ("failed", "completed", "cancelled", "expired"), batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.02)


def test_a_batch_through_the_openai_client(client: TestClient, engine: FakeEngine) -> None:
    api = sdk(client)
    rows = [chat_line(n) for n in range(20)]
    rows.append(chat_line(99, model="nope"))  # refused when it runs: an error line
    uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    validate("OpenAIFile", uploaded.model_dump(exclude_none=True))
    assert (uploaded.purpose, uploaded.bytes) == ("batch", len(jsonl(rows)))
    created = api.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
        metadata={"job": "eval"},
    )  # fmt: skip
    validate("Batch", client.get(f"/v1/batches/{created.id}", headers=ALICE).json())
    done = wait_for(api, created.id, "completed")
    raw = client.get(f"/v1/batches/{created.id}", headers=ALICE).json()
    validate("Batch", raw)
    assert raw["request_counts"] == {"total": 21, "completed": 20, "failed": 1}
    assert done.metadata == {"job": "eval"}
    assert done.output_file_id
    assert done.error_file_id
    output = [orjson.loads(x) for x in api.files.content(done.output_file_id).read().splitlines()]
    errors = [orjson.loads(x) for x in api.files.content(done.error_file_id).read().splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(f"req-{n}" for n in range(20))
    assert [e["custom_id"] for e in errors] == ["req-99"]
    for line in output:
        assert line["response"]["status_code"] == 200
        validate("CreateChatCompletionResponse", line["response"]["body"])
        assert line["response"]["body"]["choices"][0]["message"]["content"] == "Hello there!"
    assert errors[0]["response"]["status_code"] == 404
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
    out_file = client.get(f"/v1/files/{done.output_file_id}", headers=ALICE).json()
    validate("OpenAIFile", out_file)
    assert out_file["purpose"] == "batch_output"
    # through the proxy at batch priority: the engine runs vLLM's priority scheduling
    assert len(engine.calls) == 20
    assert {call["priority"] for call in engine.calls} == {10}
    metrics = client.get("/metrics").text
    assert 'weir_batch_requests_total{result="completed"} 20.0' in metrics
    assert 'weir_batch_requests_total{result="failed"} 1.0' in metrics
    listed = client.get("/v1/batches", headers=ALICE).json()
    validate("ListBatchesResponse", listed)
    assert [b["id"] for b in listed["data"]] == [created.id]
    with pytest.raises(openai.BadRequestError):
        api.batches.cancel(created.id)  # it has completed


def test_interactive_requests_get_priority_zero(client: TestClient, engine: FakeEngine) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post(CHAT, json=body, headers=ALICE).status_code == 200
    assert engine.calls[-1]["priority"] == 0
    lowered = body | {"weir": {"priority": "batch"}, "priority": -5}  # the client's own: gone
    assert client.post(CHAT, json=lowered, headers=ALICE).status_code == 200
    assert engine.calls[-1]["priority"] == 10
    wrong = client.post(CHAT, json=body | {"weir": {"priority": "now"}}, headers=ALICE)
    assert wrong.status_code == 400
    assert wrong.json()["error"]["param"] == "weir.priority"


def test_embeddings_batch(client: TestClient) -> None:
    api = sdk(client)
    rows = [{"custom_id": f"e{n}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "minilm", "input": [f"text {n}"]}} for n in range(5)]  # fmt: skip
    uploaded = api.files.create(file=("e.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                               completion_window="24h")  # fmt: skip
    done = wait_for(api, batch.id, "completed")
    assert done.error_file_id is None
    output = [orjson.loads(x) for x in api.files.content(done.output_file_id).read().splitlines()]
    assert {o["custom_id"] for o in output} == {f"e{n}" for n in range(5)}
    for line in output:
        validate("CreateEmbeddingResponse", line["response"]["body"])


def test_a_bad_input_file_fails_the_batch_with_line_numbers(client: TestClient) -> None:
    api = sdk(client)
    rows = [
        chat_line(0),
        chat_line(0),  # the same custom_id
        {**chat_line(2), "url": "/v1/embeddings"},
        {**chat_line(3), "method": "GET"},
        chat_line(4, stream=True),
        {"custom_id": "req-5", "method": "POST", "url": CHAT, "body": {"messages": []}},
    ]
    uploaded = api.files.create(file=("bad.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    raw = client.get(f"/v1/batches/{batch.id}", headers=ALICE).json()
    validate("Batch", raw)
    assert raw["status"] == "failed"
    codes = [(e["line"], e["code"]) for e in raw["errors"]["data"]]
    assert codes == [(2, "duplicate_custom_id"), (3, "mismatched_url"), (4, "invalid_method"),
                     (5, "invalid_request"), (6, "invalid_request")]  # fmt: skip


def test_uploads_and_batches_are_refused_clearly(client: TestClient) -> None:
    def upload(content: bytes, purpose: str = "batch") -> Any:
        files = {"file": ("f.jsonl", content, "application/jsonl")}
        return client.post("/v1/files", files=files, data={"purpose": purpose}, headers=ALICE)

    assert upload(b"not json\n").json()["error"]["message"] == "Line 1 is not JSON."
    assert upload(b"").status_code == 400
    assert upload(b'{"a": 1}\n', purpose="fine-tune").json()["error"]["param"] == "purpose"
    missing = client.post("/v1/files", data={"purpose": "batch"}, headers=ALICE)
    assert missing.status_code == 400
    good = upload(jsonl([chat_line(1)])).json()
    wrong = client.post(
        "/v1/batches",
        headers=ALICE,
        json={
            "input_file_id": good["id"],
            "endpoint": "/v1/moderations",
            "completion_window": "24h",
        },
    )
    assert wrong.status_code == 400
    assert wrong.json()["error"]["param"] == "endpoint"
    window = client.post(
        "/v1/batches",
        headers=ALICE,
        json={"input_file_id": good["id"], "endpoint": CHAT, "completion_window": "1h"},
    )
    assert window.status_code == 400
    unknown = client.post(
        "/v1/batches",
        headers=ALICE,
        json={"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"},
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "file_not_found")


def test_too_large_an_upload_is_a_413(engine: FakeEngine, tmp_path: Path) -> None:
    with make_client(engine, tmp_path, max_file_bytes=2048) as client:
        files = {"file": ("f.jsonl", b'{"a": "' + b"x" * 4096 + b'"}\n', "application/jsonl")}
        answer = client.post("/v1/files", files=files, data={"purpose": "batch"}, headers=ALICE)
        assert answer.status_code == 413


def test_an_upload_past_the_tenants_storage_quota_is_refused_and_not_stored(
    engine: FakeEngine, tmp_path: Path
) -> None:
    """OpenAI's answer to an upload past a project's file storage quota: a 400
    ``invalid_request_error``, nothing stored; deleting a file makes room. A batch's output
    is written even past the quota (its work is not thrown away), and then counts."""
    row = jsonl([chat_line(1)])
    with make_client(engine, tmp_path, poll_s=0.05, lease_s=1.0,
                     max_tenant_bytes=10_000, max_tenant_files=3) as client:  # fmt: skip
        api, bob = sdk(client), sdk(client, "sk-bob")

        def upload(as_: openai.OpenAI = api) -> Any:
            return as_.files.create(file=("in.jsonl", io.BytesIO(row)), purpose="batch")

        first, second = upload(), upload()
        batch = api.batches.create(input_file_id=first.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        done = wait_for(api, batch.id, "completed")  # 2 files, its output: the third
        assert done.output_file_id
        with pytest.raises(openai.BadRequestError) as refused:
            upload()
        error = refused.value.body
        assert isinstance(error, dict)
        assert (error["code"], error["type"]) == ("storage_quota_exceeded",
                                                  "invalid_request_error")  # fmt: skip
        assert "max_tenant_files" in error["message"]
        listed = client.get("/v1/files", headers=ALICE).json()["data"]
        assert len(listed) == 3  # nothing stored
        upload(bob)  # another tenant's quota is its own
        api.files.delete(second.id)
        upload()  # room again


def test_files_and_batches_are_the_tenants_own(client: TestClient) -> None:
    api, other = sdk(client), sdk(client, "sk-bob")
    uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line(1)]))),
                                purpose="batch")  # fmt: skip
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    assert client.get("/v1/batches", headers=BOB).json()["data"] == []
    listed = client.get("/v1/files", headers=ALICE).json()
    validate("ListFilesResponse", listed)
    assert uploaded.id in [f["id"] for f in listed["data"]]
    wait_for(api, batch.id, "completed")
    deleted = api.files.delete(uploaded.id)
    validate("DeleteFileResponse", deleted.model_dump())
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(uploaded.id)


def test_a_cancelled_batch_stops_and_every_line_is_accounted_for(tmp_path: Path) -> None:
    engine = FakeEngine(hang_s=3600)  # no request ever finishes on its own
    with make_client(engine, tmp_path, poll_s=0.05, lease_s=1.0, concurrency=4) as client:
        api = sdk(client)
        rows = [chat_line(n) for n in range(10)]
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 10
        while len(engine.calls) < 4:  # four requests are at the engine
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancelling = api.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = wait_for(api, batch.id, "cancelled", within_s=5)
        raw = client.get(f"/v1/batches/{batch.id}", headers=ALICE).json()
        validate("Batch", raw)
        assert raw["cancelling_at"] <= raw["cancelled_at"]
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (0, 10)
        errors = api.files.content(done.error_file_id or "").read().splitlines()
        lines = [orjson.loads(x) for x in errors]
        assert sorted(x["custom_id"] for x in lines) == sorted(r["custom_id"] for r in rows)
        assert {x["error"]["code"] for x in lines} == {"batch_cancelled"}
        assert engine.cancelled == 4  # the engine calls in flight were aborted


def test_a_restart_resumes_without_running_a_line_twice(tmp_path: Path) -> None:
    """A gateway stopped mid-batch (its requests in flight cancelled) is started again on
    the same file: the batch finishes, each line ran to a result once."""
    slow = FakeEngine(hang_s=3600)
    rows = [chat_line(n) for n in range(12)]
    with make_client(slow, tmp_path, poll_s=0.05, lease_s=1.0, concurrency=3) as client:
        api = sdk(client)
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 10
        while len(slow.calls) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    fast = FakeEngine()
    with make_client(fast, tmp_path, poll_s=0.05, lease_s=1.0) as client:
        api = sdk(client)
        done = wait_for(api, batch.id, "completed")
        output = api.files.content(done.output_file_id or "").read().splitlines()
        ids = [orjson.loads(x)["custom_id"] for x in output]
        assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # each exactly once
        assert len(fast.calls) == 12  # the three cut short ran again; nothing else twice


@pytest.mark.anyio
async def test_the_store_writes_a_result_once(tmp_path: Path) -> None:
    from serving.batches.store import BatchStore, Line

    store = BatchStore(tmp_path / "b.sqlite3")
    batch = {"id": "batch_1", "status": "in_progress", "created_at": 1}
    await store.create_batch("t", batch, {}, [Line(0, "a", b"{}"), Line(1, "b", b"{}")])
    assert await store.record("batch_1", 0, b'{"x": 1}', True)
    assert not await store.record("batch_1", 0, b'{"x": 2}', True)  # never overwritten
    assert [line.n for line in await store.pending("batch_1", 10)] == [1]
    assert (await store.claim("me", 100.0, 10))[0].batch["id"] == "batch_1"
    assert await store.claim("you", 105.0, 10) == []  # held by "me" until 110
    assert [c.batch["id"] for c in await store.claim("you", 111.0, 10)] == ["batch_1"]
    assert await store.renew("batch_1", "me", 112.0, 10) is None  # "me" lost it
    await asyncio.sleep(0)
    await store.aclose()


def test_a_result_the_store_could_not_take_is_run_again(tmp_path: Path) -> None:
    """A line whose result could not be written (the database failed that once) has no
    result: it is sent again before the batch ends, so it still gets its one line."""
    engine = FakeEngine()
    with make_client(engine, tmp_path, poll_s=0.05, lease_s=1.0) as client:
        store = client.app.api.state.batches.store  # type: ignore[attr-defined]
        record, failed = store.record, list[int]()

        async def flaky(batch_id: str, n: int, result: bytes, ok: bool) -> bool:
            if n == 3 and not failed:
                failed.append(n)
                raise BatchesUnavailable("The batch store is unavailable (test).")
            done: bool = await record(batch_id, n, result, ok)
            return done

        store.record = flaky
        api = sdk(client)
        rows = [chat_line(n) for n in range(6)]
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        done = wait_for(api, batch.id, "completed")
        assert failed == [3]
        output = api.files.content(done.output_file_id or "").read().splitlines()
        ids = sorted(orjson.loads(x)["custom_id"] for x in output)
        assert ids == [f"req-{n}" for n in range(6)]
        assert len(engine.calls) == 7  # line 3 twice: its first answer could not be kept


def test_a_gateway_that_cannot_renew_its_lease_stops_before_it_runs_out(tmp_path: Path) -> None:
    """While the store cannot be reached the lease is not renewed; once it has run out
    (another gateway may hold the batch) this one cancels its requests, and takes the
    batch up again when the store is back and nobody else did."""
    engine = FakeEngine(hang_s=3600)
    with make_client(engine, tmp_path, poll_s=0.05, lease_s=0.6, concurrency=2) as client:
        store = client.app.api.state.batches.store  # type: ignore[attr-defined]
        renew, down = store.renew, [True]

        async def unreachable(*args: Any) -> str | None:
            if down[0]:
                raise BatchesUnavailable("The batch store is unavailable (test).")
            found: str | None = await renew(*args)
            return found

        store.renew = unreachable
        api = sdk(client)
        rows = [chat_line(n) for n in range(4)]
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 5
        while engine.cancelled < 2:  # the two requests in flight, once the lease ran out
            assert time.monotonic() < deadline, "still running on a lease it no longer holds"
            time.sleep(0.01)
        engine.hang_s, down[0] = 0.0, False
        done = wait_for(api, batch.id, "completed")
        output = api.files.content(done.output_file_id or "").read().splitlines()
        ids = sorted(orjson.loads(x)["custom_id"] for x in output)
        assert ids == [f"req-{n}" for n in range(4)]
