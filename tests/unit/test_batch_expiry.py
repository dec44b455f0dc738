"""Files and batches expire as OpenAI describes, on a clock the tests move.

An upload's ``expires_after`` (through the official ``openai`` client) and a batch's
``output_expires_after`` give the File object its ``expires_at``; out-of-bounds policies
are 400s naming the field. An expired file is a 404 ``file_not_found`` for its tenant and
leaves the list; the sweep removes its row and bytes from the SQLite file, but not while
an unfinished batch reads it. A batch past its completion window ends ``expired``, also
when it is resumed after the window passed. Every object is validated against the spec.
"""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.file_create_params import ExpiresAfter
from starlette.testclient import TestClient

from serving.batches.service import Batches
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate
from tests.unit.test_batches import ALICE, CHAT, chat_line, jsonl, make_client, sdk, wait_for

JSON = dict[str, Any]
HOUR = 3600
DAY = 24 * HOUR


class Clock:
    """The time the Batch API sees: the real one plus what the test has moved it on."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead_s


def on_clock(client: TestClient, clock: Clock) -> Batches:
    """Give the app's Batch API (its files, runner and sweep) the test's clock."""
    batches: Batches = client.app.api.state.batches  # type: ignore[attr-defined]
    batches.clock = batches.runner.clock = batches.sweeper.clock = clock
    return batches


def stored_ids(path: Path) -> set[str]:
    """The file ids whose rows (and bytes) are still in the SQLite file."""
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT id FROM files")}


def upload(client: TestClient, **form: str) -> Any:
    files = {"file": ("in.jsonl", jsonl([chat_line(1)]), "application/jsonl")}
    return client.post("/v1/files", files=files, data={"purpose": "batch", **form}, headers=ALICE)


def test_upload_expires_after_through_the_openai_client(tmp_path: Path) -> None:
    clock = Clock()
    client = make_client(FakeEngine(), tmp_path, poll_s=0.05, lease_s=1.0)
    on_clock(client, clock)
    with client:
        api = sdk(client)
        data = io.BytesIO(jsonl([chat_line(1)]))
        policy: ExpiresAfter = {"anchor": "created_at", "seconds": HOUR}
        short = api.files.create(file=("in.jsonl", data), purpose="batch", expires_after=policy)
        assert short.expires_at == short.created_at + HOUR
        raw = client.get(f"/v1/files/{short.id}", headers=ALICE).json()
        validate("OpenAIFile", raw)
        assert raw["expires_at"] == short.created_at + HOUR
        kept = api.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line(2)]))),
                                purpose="batch")  # fmt: skip
        assert kept.expires_at == kept.created_at + 30 * DAY  # OpenAI's default for batch

        clock.ahead_s = HOUR  # the short one's expires_at has come
        for answer in (
            client.get(f"/v1/files/{short.id}", headers=ALICE),
            client.get(f"/v1/files/{short.id}/content", headers=ALICE),
            client.delete(f"/v1/files/{short.id}", headers=ALICE),
            client.get("/v1/files/file-never", headers=ALICE),  # as a missing file
        ):
            assert answer.status_code == 404
            validate("ErrorResponse", answer.json())
            assert answer.json()["error"]["code"] == "file_not_found"
            assert answer.json()["error"]["type"] == "invalid_request_error"
        with pytest.raises(openai.NotFoundError):
            api.files.retrieve(short.id)
        with pytest.raises(openai.NotFoundError):
            api.batches.create(input_file_id=short.id, endpoint=CHAT, completion_window="24h")
        listed = client.get("/v1/files", headers=ALICE).json()
        validate("ListFilesResponse", listed)
        assert [f["id"] for f in listed["data"]] == [kept.id]
        assert api.files.retrieve(kept.id).id == kept.id


@pytest.mark.parametrize(
    ("form", "param"),
    [
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"},
         "expires_after.seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": str(30 * DAY + 1)},
         "expires_after.seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"},
         "expires_after.seconds"),
        ({"expires_after[anchor]": "last_accessed_at", "expires_after[seconds]": "3600"},
         "expires_after.anchor"),
        ({"expires_after[seconds]": "3600"}, "expires_after.anchor"),
        ({"expires_after[anchor]": "created_at"}, "expires_after.seconds"),
    ],
)  # fmt: skip
def test_an_upload_with_a_bad_expires_after_is_a_400(
    tmp_path: Path, form: dict[str, str], param: str
) -> None:
    with make_client(FakeEngine(), tmp_path) as client:
        answer = upload(client, **form)
        assert answer.status_code == 400
        validate("ErrorResponse", answer.json())
        error = answer.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert client.get("/v1/files", headers=ALICE).json()["data"] == []  # nothing stored


def test_a_batchs_output_files_expire_after_output_expires_after(tmp_path: Path) -> None:
    clock = Clock()
    client = make_client(FakeEngine(), tmp_path, poll_s=0.05, lease_s=1.0)
    on_clock(client, clock)
    with client:
        api = sdk(client)
        rows = [chat_line(1), chat_line(2, model="nope")]  # one output line, one error line
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 2 * HOUR},
        )  # fmt: skip
        done = wait_for(api, batch.id, "completed")
        validate("Batch", client.get(f"/v1/batches/{batch.id}", headers=ALICE).json())
        for file_id in (done.output_file_id, done.error_file_id):
            record = client.get(f"/v1/files/{file_id}", headers=ALICE).json()
            validate("OpenAIFile", record)
            assert record["purpose"] == "batch_output"
            assert record["expires_at"] == record["created_at"] + 2 * HOUR  # the file's own
        plain = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        kept = wait_for(api, plain.id, "completed")
        assert "expires_at" not in client.get(f"/v1/files/{kept.output_file_id}",
                                              headers=ALICE).json()  # fmt: skip
        clock.ahead_s = 2 * HOUR
        with pytest.raises(openai.NotFoundError):
            api.files.content(done.output_file_id or "")
        assert api.files.content(kept.output_file_id or "").read()  # no policy: kept
        bad = client.post("/v1/batches", headers=ALICE, json={
            "input_file_id": uploaded.id, "endpoint": CHAT, "completion_window": "24h",
            "output_expires_after": {"anchor": "created_at", "seconds": 60}})  # fmt: skip
        assert bad.status_code == 400
        validate("ErrorResponse", bad.json())
        assert bad.json()["error"]["param"] == "output_expires_after.seconds"


def test_the_sweep_removes_expired_files_but_not_a_running_batchs_input(tmp_path: Path) -> None:
    """The app's own sweep (every 0.05 s here): an expired file's row and bytes leave the
    SQLite file, except the input of a batch still running, until that batch ends."""
    clock = Clock()
    engine = FakeEngine(hang_s=3600)  # the batch runs until cancelled
    path = tmp_path / "batches.sqlite3"
    client = make_client(engine, tmp_path, poll_s=0.05, lease_s=1.0, sweep_s=0.05)
    on_clock(client, clock)
    with client:
        api = sdk(client)
        expiring: ExpiresAfter = {"anchor": "created_at", "seconds": HOUR}
        source = api.files.create(
            file=("in.jsonl", io.BytesIO(jsonl([chat_line(1)]))),
            purpose="batch",
            expires_after=expiring,
        )
        other = api.files.create(
            file=("o.jsonl", io.BytesIO(jsonl([chat_line(2)]))),
            purpose="batch",
            expires_after=expiring,
        )
        batch = api.batches.create(input_file_id=source.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 10
        while not engine.calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        clock.ahead_s = HOUR
        while other.id in stored_ids(path):  # swept
            assert time.monotonic() < deadline, "the sweep did not run"
            time.sleep(0.02)
        time.sleep(0.2)  # a few more sweeps
        assert source.id in stored_ids(path)  # the running batch's input: kept...
        with pytest.raises(openai.NotFoundError):
            api.files.retrieve(source.id)  # ...though gone for its tenant
        assert api.batches.retrieve(batch.id).status == "in_progress"
        api.batches.cancel(batch.id)
        wait_for(api, batch.id, "cancelled", within_s=5)
        while source.id in stored_ids(path):  # the batch has ended: swept
            assert time.monotonic() < deadline, "the input file was never swept"
            time.sleep(0.02)


def test_a_batch_past_its_completion_window_expires(tmp_path: Path) -> None:
    clock = Clock()
    engine = FakeEngine(hang_s=3600)  # no request finishes on its own
    client = make_client(engine, tmp_path, poll_s=0.05, lease_s=0.3, concurrency=2)
    on_clock(client, clock)
    with client:
        api = sdk(client)
        rows = [chat_line(n) for n in range(5)]
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        assert batch.expires_at == batch.created_at + DAY
        deadline = time.monotonic() + 10
        while len(engine.calls) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        clock.ahead_s = DAY
        done = wait_for(api, batch.id, "expired", within_s=5)
        raw = client.get(f"/v1/batches/{batch.id}", headers=ALICE).json()
        validate("Batch", raw)
        assert raw["expired_at"] >= raw["expires_at"]
        assert raw["request_counts"] == {"total": 5, "completed": 0, "failed": 5}
        errors = api.files.content(done.error_file_id or "").read().splitlines()
        assert len(errors) == 5
        assert all(b'"batch_expired"' in line for line in errors)
        assert engine.cancelled == 2  # the requests in flight were aborted


def test_a_batch_resumed_after_its_window_expires_without_sending(tmp_path: Path) -> None:
    """A gateway stopped mid-batch and started again after the window: nothing is sent."""
    slow = FakeEngine(hang_s=3600)
    rows = [chat_line(n) for n in range(6)]
    with make_client(slow, tmp_path, poll_s=0.05, lease_s=1.0, concurrency=2) as client:
        api = sdk(client)
        uploaded = api.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                   completion_window="24h")  # fmt: skip
        deadline = time.monotonic() + 10
        while len(slow.calls) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    clock = Clock()
    clock.ahead_s = DAY + 60
    fast = FakeEngine()
    client = make_client(fast, tmp_path, poll_s=0.05, lease_s=1.0)
    on_clock(client, clock)  # before it starts: the runner claims the batch at once
    with client:
        api = sdk(client)
        done = wait_for(api, batch.id, "expired")
        validate("Batch", client.get(f"/v1/batches/{batch.id}", headers=ALICE).json())
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (0, 6)
        assert fast.calls == []
