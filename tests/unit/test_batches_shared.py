"""Two gateways sharing one batch store: a real PostgreSQL (``batches.database_url``, the
Helm chart's gateway pods) and one SQLite file (``weir serve --workers N`` on one host).

Each gateway is an app in-process over fake engines of its own, as in ``test_batches``.
A file or batch made through one is found through the other; exactly one of them runs a
batch (the other's engine sees nothing) while its lease is live; a cancel through the
other stops it within a renewal; and when the running gateway stops mid-batch the other
takes the batch over and finishes it, every input line with exactly one output line.
The store itself, on both databases: a result written once, two processes claiming at
once (one wins), a lease running out, the expiry sweep, and a tenant's storage quota
counted by the store as two processes write at once.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from serving.batches.store import BatchStore, Line, Quota, Usage
from serving.batches.sweeper import CHUNK, Sweeper
from serving.errors import StorageQuotaExceeded
from tests.fakes.engine import FakeEngine
from tests.retrieval_db import fresh_database
from tests.unit.test_batches import ALICE, CHAT, chat_line, jsonl, make_client, sdk, wait_for

JSON = dict[str, Any]
LEASE_S = 0.6  # renewed every 0.2 s: a cancel elsewhere is seen within that


@pytest.fixture(params=["postgres", "sqlite"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JSON]:
    """What both gateways' ``[batches]`` share: a fresh PostgreSQL database, or (nothing
    said) the SQLite file ``make_client`` puts in the test's directory."""
    if request.param == "sqlite":
        yield {}
        return
    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield {"database_url": SecretStr(url)}


def gateway(engine: FakeEngine, tmp_path: Path, shared: JSON, **more: Any) -> TestClient:
    """A gateway app of its own (its engines, runner and connections) on the shared store."""
    return make_client(engine, tmp_path, poll_s=0.05, lease_s=LEASE_S, **shared, **more)


def upload_batch(client: TestClient, rows: list[JSON]) -> tuple[str, str]:
    api = sdk(client)
    uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    return uploaded.id, batch.id


def wait_calls(engine: FakeEngine, count: int, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while len(engine.calls) < count:
        assert time.monotonic() < deadline, f"{len(engine.calls)} calls, not {count}"
        time.sleep(0.01)


def test_files_and_batches_made_through_one_gateway_are_found_and_run_once(
    tmp_path: Path, shared: JSON
) -> None:
    rows = [chat_line(n) for n in range(8)]
    one, other = FakeEngine(), FakeEngine()
    with gateway(one, tmp_path, shared) as a, gateway(other, tmp_path, shared) as b:
        file_id, batch_id = upload_batch(a, rows)
        through_b = sdk(b)
        assert through_b.files.retrieve(file_id).bytes == len(jsonl(rows))
        assert through_b.files.content(file_id).read() == jsonl(rows)
        assert file_id in [f["id"] for f in b.get("/v1/files", headers=ALICE).json()["data"]]
        assert [x["id"] for x in b.get("/v1/batches", headers=ALICE).json()["data"]] == [batch_id]
        done = wait_for(through_b, batch_id, "completed")
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (8, 8)
        output = through_b.files.content(done.output_file_id or "").read().splitlines()
        assert sorted(orjson.loads(x)["custom_id"] for x in output) == sorted(
            r["custom_id"] for r in rows
        )
        assert sdk(a).files.content(done.output_file_id or "").read().splitlines() == output
        # exactly one gateway ran it: all eight calls at one engine, none at the other
        assert sorted([len(one.calls), len(other.calls)]) == [0, 8]
        with pytest.raises(openai.NotFoundError):
            sdk(b, "sk-bob").files.retrieve(file_id)  # still the tenant's own


def test_a_cancel_through_the_other_gateway_stops_the_batch_within_a_renewal(
    tmp_path: Path, shared: JSON
) -> None:
    stuck = FakeEngine(hang_s=3600)
    with gateway(stuck, tmp_path, shared, concurrency=3) as a:
        _, batch_id = upload_batch(a, [chat_line(n) for n in range(6)])
        wait_calls(stuck, 3)  # a runs it
        with gateway(FakeEngine(), tmp_path, shared) as b:
            started = time.monotonic()
            assert sdk(b).batches.cancel(batch_id).status == "cancelling"
            done = wait_for(sdk(b), batch_id, "cancelled", within_s=5)
            assert time.monotonic() - started < LEASE_S + 1.0  # seen at a's next renewal
            assert done.request_counts is not None
            assert (done.request_counts.completed, done.request_counts.failed) == (0, 6)
            assert stuck.cancelled == 3  # a's engine calls in flight were aborted


@pytest.mark.parametrize("how", ["stopped", "died"])
def test_when_the_running_gateway_stops_the_other_finishes_the_batch(
    tmp_path: Path, shared: JSON, how: str
) -> None:
    """``stopped``: a gives its lease back as it shuts down; ``died``: it does not (as
    when killed), and b takes the batch once a's lease has run out."""
    rows = [chat_line(n) for n in range(12)]
    slow, fast = FakeEngine(hang_s=3600), FakeEngine()
    a = gateway(slow, tmp_path, shared, concurrency=3)
    with gateway(fast, tmp_path, shared) as b:
        with a:
            _, batch_id = upload_batch(a, rows)
            wait_calls(slow, 3)  # a holds it...
            time.sleep(LEASE_S * 2)  # ...and renews its lease: b takes nothing meanwhile
            assert fast.calls == []
            assert sdk(b).batches.retrieve(batch_id).status == "in_progress"
            if how == "died":
                runner = a.app.api.state.batches.runner  # type: ignore[attr-defined]
                runner.store = _NoRelease(runner.store)  # its lease is not given back
        # a stopped: its three requests in flight were cancelled (they wrote no result)
        done = wait_for(sdk(b), batch_id, "completed")
        output = sdk(b).files.content(done.output_file_id or "").read().splitlines()
        ids = [orjson.loads(x)["custom_id"] for x in output]
        assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # each exactly once
        assert done.error_file_id is None
        assert len(fast.calls) == 12  # b ran every line: a wrote no result
        assert done.request_counts is not None
        assert done.request_counts.total == done.request_counts.completed == 12


class _NoRelease:
    """A dead gateway's store: it never gives a lease back."""

    def __init__(self, store: BatchStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def release(self, batch_id: str, owner: str) -> None:
        return None


# -- the store, on both databases -------------------------------------------------------


def store_target(shared: JSON, tmp_path: Path) -> Path | str:
    url = shared.get("database_url")
    return url.get_secret_value() if url is not None else tmp_path / "batches.sqlite3"


@pytest.mark.anyio
async def test_two_stores_claim_a_batch_once_and_write_a_result_once(
    shared: JSON, tmp_path: Path
) -> None:
    target = store_target(shared, tmp_path)
    mine, yours = BatchStore(target), BatchStore(target)
    try:
        batch = {"id": "batch_1", "status": "in_progress", "created_at": 1}
        await mine.create_batch("t", batch, {"who": 1}, [Line(0, "a", b"{}"), Line(1, "b", b"{}")])
        claims = await asyncio.gather(*(
            store.claim(owner, 100.0, 10) for store, owner in [(mine, "me"), (yours, "you")] * 4
        ))  # fmt: skip
        holders = {owner for owner, got in zip(["me", "you"] * 4, claims, strict=True) if got}
        assert len(holders) == 1  # one of them holds it; the other's claims found it held
        holder = holders.pop()
        other = "you" if holder == "me" else "me"
        assert await yours.claim(other, 105.0, 10) == []  # held until 110
        assert await yours.renew("batch_1", holder, 105.0, 10) == "in_progress"
        assert await yours.claim(other, 114.0, 10) == []  # renewed: held until 115
        taken = await yours.claim(other, 116.0, 10)  # the holder died: its lease ran out
        assert [(c.batch["id"], c.caller) for c in taken] == [
            ("batch_1", {"who": 1, "input_bytes": 4})  # its lines' bodies: they count
        ]  # fmt: skip
        assert await mine.renew("batch_1", holder, 117.0, 10) is None  # it lost it
        assert await mine.record("batch_1", 0, b'{"x": 1}', True)
        assert not await yours.record("batch_1", 0, b'{"x": 2}', False)  # never overwritten
        assert [line.n for line in await yours.pending("batch_1", 10)] == [1]
        assert await yours.counts("batch_1") == (2, 1, 0)
        assert await mine.results("batch_1") == (b'{"x": 1}\n', b"")
    finally:
        await mine.aclose()
        await yours.aclose()


@pytest.mark.anyio
async def test_the_sweep_on_both_databases(shared: JSON, tmp_path: Path) -> None:
    store = BatchStore(store_target(shared, tmp_path))

    def record(file_id: str, expires_at: int | None) -> JSON:
        found: JSON = {"id": file_id, "object": "file", "created_at": 1, "purpose": "batch"}
        return found if expires_at is None else found | {"expires_at": expires_at}

    try:
        for n in range(CHUNK * 2 + 3):
            await store.put_file("t", record(f"old-{n}", 100), b"x" * 1000)
        await store.put_file("t", record("source", 100), b"{}")
        await store.put_file("t", record("kept", None), b"\x00\xff")
        await store.put_file("t", record("later", 200), b"{}")
        batch = {"id": "batch_1", "input_file_id": "source", "status": "in_progress",
                 "created_at": 1}  # fmt: skip
        await store.create_batch("t", batch, {}, [Line(0, "a", b"{}")])
        assert await store.file("t", "old-0", 99.0) is not None
        assert await store.file("t", "old-0", 100.0) is None  # expired at its expires_at
        assert await store.sweep(99.0, CHUNK) == 0  # nothing has expired yet
        sweeper = Sweeper(store, 60.0, clock=lambda: 150.0)
        assert await sweeper.sweep() == CHUNK * 2 + 3  # the old ones, chunk by chunk
        assert await store.content("t", "source", 99.0) == b"{}"  # a running batch's: kept
        assert await store.content("t", "kept", 150.0) == b"\x00\xff"  # bytes as they were
        await store.finish(batch | {"status": "completed"}, [], "t")
        assert await sweeper.sweep() == 1  # the batch has ended: its input goes
        assert await store.content("t", "source", 99.0) is None
        assert [f["id"] for f in await store.files("t", None, 10, True, 150.0)] == [
            "later", "kept"
        ]  # fmt: skip
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_the_storage_quota_holds_when_two_stores_write_at_once(
    shared: JSON, tmp_path: Path
) -> None:
    """Two gateways' stores, 32 uploads of 100 bytes each at once against 1,000 bytes: ten
    are stored, whichever they are, and the others refused with nothing written
    (PostgreSQL counts under the tenant's lock; counted without it, several saw room)."""
    target = store_target(shared, tmp_path)
    mine, yours = BatchStore(target), BatchStore(target)
    quota = Quota(max_bytes=1000, max_files=100)

    def record(n: int) -> JSON:
        return {"id": f"file-{n}", "object": "file", "created_at": 100, "purpose": "batch"}

    async def put(store: BatchStore, n: int) -> bool:
        try:
            await store.put_file("t", record(n), b"x" * 100, quota)
        except StorageQuotaExceeded:
            return False
        return True

    try:
        await mine.put_file("other", record(99), b"y" * 900, quota)  # another tenant's
        await asyncio.gather(put(mine, 100), put(yours, 101))  # both connected
        stored = await asyncio.gather(*(put((mine, yours)[n % 2], n) for n in range(32)))
        assert sum(stored) == 8
        assert len(await yours.files("t", None, 100, True, 100.0)) == 10
        assert (await mine.usage("t", 100.0)).bytes == 1000
    finally:
        await mine.aclose()
        await yours.aclose()


@pytest.mark.anyio
async def test_what_the_storage_quota_counts(shared: JSON, tmp_path: Path) -> None:
    """Live files (not expired ones), a running batch's input lines until it ends, then
    its output files, written even past the quota; the file count apart from bytes."""
    store = BatchStore(store_target(shared, tmp_path))
    quota = Quota(max_bytes=1000, max_files=3)

    def record(file_id: str, **more: Any) -> JSON:
        return {"id": file_id, "object": "file", "created_at": 100, "purpose": "batch"} | more

    try:
        await store.put_file("t", record("gone", expires_at=150), b"x" * 900, quota)
        with pytest.raises(StorageQuotaExceeded, match="max_tenant_bytes"):
            await store.put_file("t", record("late"), b"x" * 200, quota)
        assert await store.file("t", "late", 120.0) is None  # nothing stored
        await store.put_file("t", record("in", created_at=200), b"x" * 400, quota)  # expired
        batch = {"id": "batch_q", "status": "in_progress", "created_at": 200}
        lines = [Line(n, f"r{n}", b"y" * 100) for n in range(4)]
        await store.create_batch("t", batch, {}, lines, quota)
        assert await store.usage("t", 200.0) == Usage(bytes=800, files=1)  # file and lines
        with pytest.raises(StorageQuotaExceeded):  # its lines count while it runs
            await store.create_batch("t", batch | {"id": "batch_r"}, {}, lines, quota)
        with pytest.raises(StorageQuotaExceeded):
            await store.put_file("t", record("more", created_at=200), b"x" * 201, quota)
        for n in range(4):
            await store.record("batch_q", n, b"z" * 200, True)
        output = record("out", created_at=200, purpose="batch_output")
        await store.finish(batch | {"status": "completed"}, [(output, b"z" * 800)], "t")
        usage = await store.usage("t", 200.0)
        assert (usage.bytes, usage.files) == (1200, 2)  # over: the output was written
        assert await store.pending("batch_q", 10) == []  # its lines are gone
        assert await store.counts("batch_q") == (0, 0, 0)
        again = batch | {"status": "failed"}  # a second finish (a lost lease) writes nothing
        await store.finish(again, [(record("dup", created_at=200), b"d" * 10)], "t")
        assert await store.file("t", "dup", 200.0) is None
        assert (await store.batch("t", "batch_q") or {})["status"] == "completed"
        await store.delete_file("t", "out", 200.0)
        await store.put_file("t", record("a", created_at=200), b"1", quota)
        await store.put_file("t", record("b", created_at=200), b"1", quota)
        with pytest.raises(StorageQuotaExceeded, match="max_tenant_files"):
            await store.put_file("t", record("c", created_at=200), b"1", quota)
    finally:
        await store.aclose()


def test_an_id_no_store_can_hold_is_not_found(tmp_path: Path, shared: JSON) -> None:
    """NUL (which PostgreSQL's text cannot hold) in an id: a 404 as for any id that does
    not exist, never the store's error (503)."""
    with gateway(FakeEngine(), tmp_path, shared) as client:
        for path in ("/v1/files/file-a%00b", "/v1/files/file-a%00b/content",
                     "/v1/batches/batch_a%00b"):  # fmt: skip
            assert client.get(path, headers=ALICE).status_code == 404, path
        assert client.delete("/v1/files/file-a%00b", headers=ALICE).status_code == 404
        assert client.post("/v1/batches/batch_a%00b/cancel", headers=ALICE).status_code == 404
        listed = client.get("/v1/batches", params={"after": "batch_a\x00b"}, headers=ALICE)
        assert listed.status_code == 200, listed.text
        # a lone surrogate is not a string to the request's validation: a 400 before that
        for bad, status in (("file-a\\u0000b", 404), ("file-\\ud800", 400)):
            body = f'{{"input_file_id": "{bad}", "endpoint": "{CHAT}", "completion_window": "24h"}}'
            made = client.post("/v1/batches", content=body.encode(),
                               headers=ALICE | {"content-type": "application/json"})  # fmt: skip
            assert made.status_code == status, made.text
            assert made.json()["error"]["param"] == "input_file_id"
