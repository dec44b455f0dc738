"""A hostile tenant with a valid key against the newer routes: the Batch API and files,
the Responses API, the pass-through routes and ``/v1/models/{id}``.

The real gateway in-process over fake engines, with store keys (each its own tenant) and
the Batch and Responses stores in the test's directory. Every refusal is a 4xx from the
error table in bounded time, never a 500; another tenant's objects stay out of reach and
intact; batch lines and responses are charged to the key's limits as chat requests are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.types import Message

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.batches import lines
from serving.http.app import create_app
from serving.settings import BatchesConfig, GatewayConfig, KeysConfig, ResponsesConfig, Settings
from tests.unit.test_passthrough import PassEngine
from tests.windows import hold_limit_window

JSON = dict[str, Any]
ADMIN = "admin-secret-for-new-route-tests"
CHAT = "/v1/chat/completions"
LINE = GatewayConfig().max_body_bytes  # a batch line's limit: a request's


class Rig:
    def __init__(self, client: TestClient, chat: PassEngine) -> None:
        self.client, self.chat = client, chat

    def key(self, **fields: Any) -> dict[str, str]:
        made = self.client.post("/weir/admin/keys", json={"name": "t", **fields},
                                headers=bearer(ADMIN))  # fmt: skip
        assert made.status_code == 200, made.text
        return bearer(made.json()["key"])

    def upload(self, key: dict[str, str], content: bytes) -> Any:
        files = {"file": ("in.jsonl", content)}
        return self.client.post("/v1/files", files=files, data={"purpose": "batch"}, headers=key)

    def batch(self, key: dict[str, str], content: bytes) -> JSON:
        uploaded = self.upload(key, content)
        assert uploaded.status_code == 200, uploaded.text
        body = {"input_file_id": uploaded.json()["id"], "endpoint": CHAT,
                "completion_window": "24h"}  # fmt: skip
        created = self.client.post("/v1/batches", json=body, headers=key)
        assert created.status_code == 200, created.text
        batch: JSON = created.json()
        return batch

    def ended(self, key: dict[str, str], batch_id: str, within_s: float = 10) -> JSON:
        deadline = time.monotonic() + within_s
        while True:
            batch: JSON = self.client.get(f"/v1/batches/{batch_id}", headers=key).json()
            if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                return batch
            assert time.monotonic() < deadline, batch
            time.sleep(0.02)


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def settings(tmp_path: Path, **batches: Any) -> Settings:
    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    return Settings(
        keys=keys,
        batches=BatchesConfig(sqlite_path=tmp_path / "batches.sqlite3", poll_s=0.05,
                              lease_s=1.0, **batches),
        responses=ResponsesConfig(sqlite_path=tmp_path / "responses.sqlite3"),
    )  # fmt: skip


def fleet_of(chat: PassEngine, embed: PassEngine) -> Any:
    def fleet(_: object) -> Fleet:
        return Fleet(
            [Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
             Replica(ReplicaKey("minilm", "l6-v2", 0), embed, "minilm")],
            health_interval_s=0.05,
        )  # fmt: skip

    return fleet


@contextmanager
def running(config: Settings) -> Iterator[Rig]:
    chat = PassEngine(name="chat")
    app = create_app(config, fleet_factory=fleet_of(chat, PassEngine(name="embed")),
                     counters={})  # fmt: skip
    with TestClient(app, raise_server_exceptions=False) as client:
        hold_limit_window(client.app)  # its minute never ends under a test
        yield Rig(client, chat)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with running(settings(tmp_path)) as made:
        yield made


def chat_line(n: int, model: str = "smollm2", **body: Any) -> bytes:
    request = {"model": model, "messages": [{"role": "user", "content": f"q{n}"}], **body}
    return orjson.dumps({"custom_id": f"r{n}", "method": "POST", "url": CHAT, "body": request})


def nested(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


def refused(answer: Any, status: int = 400) -> JSON:
    assert answer.status_code == status, answer.text[:300]
    error: JSON = answer.json()["error"]
    return error


# --- batch input files ------------------------------------------------------------------


def test_a_line_nested_deeper_than_json_is_written_is_a_line_error(rig: Rig) -> None:
    """orjson reads 1,024 levels and writes 254: the line was read, its body could not be
    written back, and the batch's create was a 500."""
    key = rig.key()
    deep = chat_line(1, frobnicate="DEEP").replace(b'"DEEP"', b"[" * 400 + b"]" * 400)
    batch = rig.batch(key, deep + b"\n" + chat_line(2) + b"\n")
    assert batch["status"] == "failed"
    errors = batch["errors"]["data"]
    assert [(e["line"], e["param"]) for e in errors] == [(1, "body")]
    assert "nested" in errors[0]["message"]
    assert rig.chat.calls == []


def test_a_file_of_millions_of_tiny_lines_is_refused_cheaply(rig: Rig) -> None:
    """48 MB of ``{}`` lines: split into a list at once it was ~16 million objects (a
    gigabyte, 7 s of work holding the GIL); now refused by its count of lines."""
    content = b"{}\n" * (16 * 2**20)
    for check in (
        lambda: lines.check_jsonl(content, 50_000, LINE),
        lambda: lines.parse(content, CHAT, 50_000, LINE),
    ):
        tracemalloc.start()
        started = time.perf_counter()
        try:
            result = check()
            took = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "more than 50000 requests" in str(result).lower(), result
        assert took < 1.0, took
        assert peak < 8 * 2**20, peak  # bytes allocated while checking, the file aside
    blank = b"\n" * 2_000_000 + chat_line(1)  # blank lines are lines too
    error = refused(rig.upload(rig.key(), blank))
    assert "requests" in error["message"]
    assert error["param"] == "file"


def test_a_line_is_no_larger_than_a_request(rig: Rig) -> None:
    """A line is a request to the route: it had up to the whole file's 50 MB, more than the
    route's own body limit, validated again on the event loop for every try."""
    key = rig.key()
    limit = GatewayConfig().max_body_bytes  # the routes' own
    filler = "x" * limit
    error = refused(rig.upload(key, chat_line(1) + b"\n" + chat_line(2, user=filler) + b"\n"))
    assert error["message"].startswith("Line 2 is ")
    assert error["param"] == "file"
    within = chat_line(3, user="x" * (limit - 1000))
    assert len(within) <= limit
    assert rig.upload(key, within).status_code == 200
    assert [e["code"] for e in lines.parse(chat_line(2, user=filler), CHAT, 10, limit)[1]] == [
        "line_too_large"
    ]


def test_a_line_follows_the_gateways_own_body_limit(tmp_path: Path) -> None:
    """The line limit was a constant (the default body limit, 4 MiB): a gateway set to take
    64 KiB requests took 4 MiB ones in batches."""
    config = settings(tmp_path).model_copy(update={"gateway": GatewayConfig(max_body_bytes=65_536)})
    with running(config) as r:
        key = r.key()
        line = chat_line(1, user="x" * 100_000)
        error = refused(r.upload(key, line + b"\n"))
        assert error["message"] == f"Line 1 is {len(line)} bytes; a request is at most 65536."
        assert r.upload(key, chat_line(1, user="x" * 60_000) + b"\n").status_code == 200


def test_an_endless_upload_without_a_length_is_cut_at_the_file_limit(tmp_path: Path) -> None:
    config = Settings(
        gateway=GatewayConfig(api_keys=[SecretStr("sk-a")]),
        batches=BatchesConfig(sqlite_path=tmp_path / "b.sqlite3", max_file_bytes=65_536),
    )
    app = create_app(config, fleet_factory=fleet_of(PassEngine(), PassEngine()), counters={})
    head = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--B\r\n'
        b'Content-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    )
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("t", 80),
        "headers": [(b"authorization", b"Bearer sk-a"),
                    (b"content-type", b"multipart/form-data; boundary=B")],
    }  # fmt: skip
    sent = 0

    async def receive() -> Message:  # no Content-Length, and it never ends
        nonlocal sent
        chunk = head if sent == 0 else b'{"a": 1}\n' * 1024
        sent += len(chunk)
        await asyncio.sleep(0)
        return {"type": "http.request", "body": chunk, "more_body": True}

    out: list[Message] = []

    async def send(message: Message) -> None:
        out.append(message)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(run())
    assert out[0]["status"] == 413
    assert sent < 65_536 + 2**16 + 2 * 9 * 1024  # read no further than the limit


# --- filling the disk ------------------------------------------------------------------


def stored(path: Path, sql: str) -> Any:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchone()[0]


def test_a_tenant_cannot_fill_the_disk_with_files_or_batches(tmp_path: Path) -> None:
    """Uploads were stored without end, and every batch kept a copy of its input forever:
    now a tenant's files stop at batches.max_tenant_bytes (a 400 before anything is
    stored; other tenants unaffected), and a batch's lines go when it ends."""
    quota = 256 * 1024
    with running(settings(tmp_path, max_tenant_bytes=quota)) as r:
        mallory, alice = r.key(), r.key()
        big = chat_line(1, messages=[{"role": "user", "content": "x" * 60_000}]) + b"\n"
        answers = [r.upload(mallory, big) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 4 + [400] * 2
        error = answers[-1].json()["error"]
        assert (error["code"], error["type"]) == ("storage_quota_exceeded",
                                                  "invalid_request_error")  # fmt: skip
        assert str(quota) in error["message"]
        db = tmp_path / "batches.sqlite3"
        assert stored(db, "SELECT SUM(LENGTH(content)) FROM files") == 4 * len(big) <= quota
        assert r.upload(alice, big).status_code == 200  # her quota is her own
        for file_id in [a.json()["id"] for a in answers[1:4]]:
            assert r.client.delete(f"/v1/files/{file_id}", headers=mallory).status_code == 200
        source = answers[0].json()["id"]
        body = {"input_file_id": source, "endpoint": CHAT, "completion_window": "24h"}
        for _ in range(5):  # each copied the 60 KB input into the store, never removed
            made = r.client.post("/v1/batches", json=body, headers=mallory)
            assert made.status_code == 200, made.text
            done = r.ended(mallory, made.json()["id"])
            assert done["status"] == "completed", done.get("errors")
        assert stored(db, "SELECT COUNT(*) FROM lines") == 0
        assert stored(db, "SELECT SUM(LENGTH(content)) FROM files") < 2 * len(big) + 10_000


def test_uploads_are_charged_to_the_keys_request_limit(rig: Rig) -> None:
    key = rig.key(rpm=2)
    answers = [rig.upload(key, chat_line(n) + b"\n") for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert len(rig.client.get("/v1/files", headers=key).json()["data"]) == 2


def test_a_tenant_cannot_fill_the_response_store(tmp_path: Path) -> None:
    """Every stored response was kept for 30 days, however many: now a tenant keeps at
    most responses.max_tenant_records, its oldest evicted; another tenant's stay."""
    responses = ResponsesConfig(sqlite_path=tmp_path / "responses.sqlite3", max_tenant_records=5)
    with running(settings(tmp_path).model_copy(update={"responses": responses})) as r:
        mallory, alice = r.key(), r.key()
        body = {"model": "smollm2", "input": "hi"}
        kept = r.client.post("/v1/responses", json=body, headers=alice).json()["id"]
        made = []
        for _ in range(12):
            answer = r.client.post("/v1/responses", json=body, headers=mallory)
            assert answer.status_code == 200, answer.text
            made.append(answer.json()["id"])
        db = tmp_path / "responses.sqlite3"
        assert stored(db, "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM responses "
                          "GROUP BY tenant)") == 5  # fmt: skip
        assert r.client.get(f"/v1/responses/{made[0]}", headers=mallory).status_code == 404
        assert r.client.get(f"/v1/responses/{made[-1]}", headers=mallory).status_code == 200
        assert r.client.get(f"/v1/responses/{kept}", headers=alice).status_code == 200


# --- what a batch's lines may do --------------------------------------------------------


def test_batch_lines_are_charged_to_the_keys_request_limit(rig: Rig) -> None:
    key = rig.key(rpm=3)  # the upload is one request (creating the batch is not): 2 lines run
    batch = rig.batch(key, b"".join(chat_line(n) + b"\n" for n in range(5)))
    time.sleep(1.0)  # the runner has had its chances; the rest wait for the next minute
    assert len(rig.chat.calls) == 2
    counts = rig.client.get(f"/v1/batches/{batch['id']}", headers=key).json()["request_counts"]
    assert counts == {"total": 5, "completed": 2, "failed": 0}
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    assert refused(rig.client.post(CHAT, json=chat, headers=key), 429)["code"] == (
        "rate_limit_exceeded"
    )
    assert len(rig.chat.calls) == 2


def test_a_batch_line_for_a_model_the_key_may_not_use_never_reaches_it(rig: Rig) -> None:
    key = rig.key(models=["minilm"])
    batch = rig.ended(key, rig.batch(key, chat_line(1) + b"\n")["id"])
    assert batch["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
    found = rig.client.get(f"/v1/files/{batch['error_file_id']}/content", headers=key)
    result = orjson.loads(found.content)["response"]
    assert result["status_code"] == 403
    assert result["body"]["error"]["code"] == "permission_denied"
    assert rig.chat.calls == []


def test_another_tenants_batch_and_file_cannot_be_cancelled_or_deleted(rig: Rig) -> None:
    alice, bob = rig.key(rpm=1), rig.key()  # alice's batch waits on her limit: running
    batch = rig.batch(alice, chat_line(1) + b"\n" + chat_line(2) + b"\n")
    file_id = batch["input_file_id"]
    assert (
        refused(rig.client.post(f"/v1/batches/{batch['id']}/cancel", headers=bob), 404)["code"]
        == "batch_not_found"
    )
    assert (
        refused(rig.client.delete(f"/v1/files/{file_id}", headers=bob), 404)["code"]
        == "file_not_found"
    )
    listed = rig.client.get(f"/v1/batches?after={batch['id']}", headers=bob).json()
    assert listed["data"] == []
    mine = rig.client.get(f"/v1/batches/{batch['id']}", headers=alice).json()
    assert mine["status"] == "in_progress"
    assert rig.client.get(f"/v1/files/{file_id}/content", headers=alice).status_code == 200


# --- the Responses API ------------------------------------------------------------------


def test_another_tenants_response_is_not_found_and_stays(rig: Rig) -> None:
    alice, bob = rig.key(), rig.key()
    made = rig.client.post("/v1/responses", json={"model": "smollm2", "input": "hi"},
                           headers=alice)  # fmt: skip
    assert made.status_code == 200, made.text
    path = f"/v1/responses/{made.json()['id']}"
    again = {"model": "smollm2", "input": "more", "previous_response_id": made.json()["id"]}
    for answer in (
        rig.client.get(path, headers=bob),
        rig.client.get(path + "/input_items", headers=bob),
        rig.client.delete(path, headers=bob),
        rig.client.post("/v1/responses", json=again, headers=bob),
    ):
        assert refused(answer, 404)["code"] == "response_not_found"
    assert len(rig.chat.calls) == 1
    assert rig.client.get(path, headers=alice).status_code == 200
    assert rig.client.post("/v1/responses", json=again, headers=alice).status_code == 200


def test_responses_are_charged_to_the_keys_limits(rig: Rig) -> None:
    key = rig.key(rpm=2)
    body = {"model": "smollm2", "input": "hi"}
    statuses = [rig.client.post("/v1/responses", json=body, headers=key).status_code
                for _ in range(3)]  # fmt: skip
    assert statuses == [200, 200, 429]
    tpm = rig.key(tpm=100)
    error = refused(rig.client.post("/v1/responses", json=body | {"max_output_tokens": 500},
                                    headers=tpm), 429)  # fmt: skip
    assert error["code"] == "rate_limit_exceeded"
    assert len(rig.chat.calls) == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": nested(100)}]},
         "tools[0].function.parameters"),
        ({"input": [{"role": "user", "content": "x"}] * 3000}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "s",
                              "schema": {"$ref": "file:///etc/passwd"}}}},
         "text.format.json_schema.schema"),
        ({"prompt": nested(100)}, "prompt"),
    ],
)  # fmt: skip
def test_hostile_response_bodies_are_refused_before_the_engine(
    rig: Rig, body: JSON, param: str
) -> None:
    answer = rig.client.post("/v1/responses", json={"model": "smollm2", "input": "hi"} | body,
                             headers=rig.key())  # fmt: skip
    assert refused(answer)["param"] == param
    assert rig.chat.calls == []


# --- pass-through routes and model ids --------------------------------------------------


@pytest.mark.parametrize("tokens", [[-1], [2**40], [1] * 1_000_001])
def test_detokenize_ids_are_bounded_before_the_engine(rig: Rig, tokens: list[int]) -> None:
    answer = rig.client.post("/detokenize", json={"model": "smollm2", "tokens": tokens},
                             headers=rig.key())  # fmt: skip
    assert refused(answer)["param"].startswith("tokens")
    assert rig.chat.calls == []


@pytest.mark.parametrize(
    "model_id",
    ["smollm2:..%2F..%2Fetc%2Fpasswd", "smollm2%00", "smollm2:a:b", "smollm2@v1:x:y", ":@",
     "smollm2@", "x" * 4000, "smollm2@..%2F..", "minilm"],
)  # fmt: skip
def test_odd_model_ids_are_a_404(rig: Rig, model_id: str) -> None:
    answer = rig.client.get(f"/v1/models/{model_id}", headers=rig.key(models=["smollm2"]))
    assert refused(answer, 404)["code"] == "model_not_found"
