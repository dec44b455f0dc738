"""``POST /v1/files`` reads its body only once the caller is admitted, and in memory.

FastAPI read the multipart form (``File()``/``Form()``) before the endpoint ran, and
Starlette spooled a file part over 1 MiB to a temporary file on disk: a key past its
``rpm`` still had the gateway read, parse and write to disk up to ``max_file_bytes`` a
request before its 429. The real gateway in-process with store keys (their limits in the
in-process limit store); the ASGI receive channel is watched to see what was read.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from serving.http.app import create_app
from serving.settings import BatchesConfig, KeysConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.unit.test_batches import chat_line, jsonl, make_client
from tests.windows import hold_limit_window

ADMIN = "admin-secret-for-upload-tests"
FILES = "/v1/files"


class Watched:
    """The app, with the request body bytes it had read when it started its answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.read_before_answer: int | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
            return message

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.read_before_answer = read
            await send(message)

        await self.app(scope, counted, answer)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[TestClient, Watched]]:
    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    batches = BatchesConfig(sqlite_path=tmp_path / "batches.sqlite3", poll_s=0.05)
    gateway = create_app(Settings(keys=keys, batches=batches), counters={})
    app = Watched(gateway)
    with TestClient(app, raise_server_exceptions=False) as client:
        hold_limit_window(gateway)  # its minute never ends under the test
        yield client, app


def key(client: TestClient, **limits: Any) -> dict[str, str]:
    made = client.post("/weir/admin/keys", json={"name": "t", **limits},
                       headers={"authorization": f"Bearer {ADMIN}"})  # fmt: skip
    assert made.status_code == 200, made.text
    return {"authorization": f"Bearer {made.json()['key']}"}


def big_file(mib: int) -> bytes:
    """Valid batch input of about ``mib`` MiB (lines of 100 KB)."""
    count = mib * 2**20 // 100_000 + 1
    return jsonl([chat_line(n, user="x" * 100_000) for n in range(count)])


def test_an_upload_past_the_keys_rpm_is_refused_before_its_body_is_read(
    watched: tuple[TestClient, Watched],
) -> None:
    client, app = watched
    limited = key(client, rpm=1)
    small = {"file": ("a.jsonl", jsonl([chat_line(1)]))}
    assert client.post(FILES, files=small, data={"purpose": "batch"}, headers=limited).is_success
    big = {"file": ("b.jsonl", big_file(3))}
    refused = client.post(FILES, files=big, data={"purpose": "batch"}, headers=limited)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert app.read_before_answer == 0  # no byte of the 3 MiB read, parsed or spooled
    assert len(client.get(FILES, headers=limited).json()["data"]) == 1


def test_an_upload_over_a_mib_is_stored_without_touching_the_disk(
    watched: tuple[TestClient, Watched], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``SpooledTemporaryFile`` past its size rolls over to ``tempfile.TemporaryFile``."""
    client, _ = watched
    made: list[object] = []
    real = tempfile.TemporaryFile

    def recorded(*args: Any, **kwargs: Any) -> Any:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recorded)
    owner = key(client)
    content = big_file(2)
    assert len(content) > 2 * 2**20
    uploaded = client.post(FILES, files={"file": ("b.jsonl", content)},
                           data={"purpose": "batch"}, headers=owner)  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    assert made == []
    assert uploaded.json()["bytes"] == len(content)
    stored = client.get(f"{FILES}/{uploaded.json()['id']}/content", headers=owner)
    assert stored.content == content


GOOD = ("in.jsonl", b'{"a": 1}\n')
MULTIPART_X = "multipart/form-data; boundary=x"
MANY_FIELDS = {"purpose": "batch"} | {f"f{n}": "x" for n in range(9)}  # 10 fields: past 8


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"json": {"purpose": "batch"}}, "file"),  # not multipart
        ({"data": {"purpose": "batch"}}, "file"),  # a form, but no file in it
        ({"files": {"purpose": (None, "batch")}}, "file"),  # multipart, no file
        ({"files": {"file": GOOD}}, "purpose"),
        ({"files": [("file", GOOD), ("file", GOOD)], "data": {"purpose": "batch"}}, "file"),
        ({"content": b"--x\r\nnot a part", "headers": {"content-type": MULTIPART_X}}, "file"),
        ({"content": b"", "headers": {"content-type": "multipart/form-data"}}, "file"),
        ({"files": {"file": GOOD}, "data": MANY_FIELDS}, "file"),
    ],
)
def test_a_body_that_is_not_the_upload_form_is_a_400_naming_the_field(
    engine_client: TestClient, request_: dict[str, Any], param: str
) -> None:
    sent = dict(request_)
    headers = {"authorization": "Bearer sk-alice"} | sent.pop("headers", {})
    answer = engine_client.post(FILES, headers=headers, **sent)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert engine_client.get(FILES, headers=headers).json()["data"] == []


@pytest.fixture(scope="module")
def engine_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(FakeEngine(), tmp_path_factory.mktemp("upload")) as client:
        yield client


def test_the_openapi_document_describes_the_upload_form(engine_client: TestClient) -> None:
    document = engine_client.get("/openapi.json", headers={"authorization": "Bearer sk-alice"})
    operation = document.json()["paths"][FILES]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file", "purpose"]
    assert set(schema["properties"]) == {
        "file", "purpose", "expires_after[anchor]", "expires_after[seconds]",
    }  # fmt: skip
    assert "429" in operation["responses"]


UPLOAD_HEAD = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"a"'


async def _leave_mid_body(app: Any, authorization: str) -> list[int]:
    """POST /v1/files whose client sends part of the body and leaves: the statuses sent."""
    messages: list[Message] = [
        {"type": "http.request", "body": UPLOAD_HEAD, "more_body": True},
        {"type": "http.disconnect"},
    ]
    statuses: list[int] = []

    async def receive() -> Message:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    headers = [(b"authorization", authorization.encode()), (b"content-length", b"4096"),
               (b"content-type", MULTIPART_X.encode())]  # fmt: skip
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": FILES, "raw_path": FILES.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
    await app(scope, receive, send)
    return statuses


def test_a_client_that_leaves_mid_upload_is_not_a_server_error_and_frees_its_slot(
    watched: tuple[TestClient, Watched], caplog: pytest.LogCaptureFixture
) -> None:
    """The parser's ``ClientDisconnect`` was an unhandled error (its traceback logged, a
    500) where FastAPI's form reading had made it a 400: now the client closed (499)."""
    client, app = watched
    owner = key(client, max_concurrency=1)
    assert client.portal is not None
    with caplog.at_level(logging.INFO, logger="weir"):
        statuses = client.portal.call(_leave_mid_body, app, owner["authorization"])
    assert statuses in ([], [499]), statuses  # nobody reads it; never a 500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    small = {"file": ("a.jsonl", jsonl([chat_line(1)]))}  # the one slot was given back
    assert client.post(FILES, files=small, data={"purpose": "batch"}, headers=owner).is_success


def test_a_chunked_upload_past_the_bound_is_a_413_and_no_error_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Front answers 413 as the count passes ``max_file_bytes + FORM_BYTES`` and the route
    sees the client leave: that was logged as an unhandled error with its traceback."""

    def body() -> Iterator[bytes]:  # no Content-Length: chunked, counted as read
        yield UPLOAD_HEAD
        for _ in range(100):
            yield b"y" * 1000

    limited = make_client(FakeEngine(), tmp_path, max_file_bytes=1024)
    with limited as client, caplog.at_level(logging.INFO, logger="weir"):
        answer = client.post(FILES, content=body(), headers={
            "authorization": "Bearer sk-alice", "content-type": MULTIPART_X})  # fmt: skip
    assert answer.status_code == 413, answer.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("filename", "charset"),
    [
        (b"a\x00b\x01.jsonl", ""),  # NUL: PostgreSQL's text (and jsonb) take none: a 503
        (b"a+2D0-.jsonl", "; charset=utf-7"),  # decodes to a lone surrogate: not UTF-8, a 500
    ],
)
def test_a_filename_the_store_cannot_keep_is_stored_cleaned(
    engine_client: TestClient, filename: bytes, charset: str
) -> None:
    body = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="' + filename
            + b'"\r\n\r\n' + jsonl([chat_line(1)]) + b'\r\n--x\r\nContent-Disposition: '
            b'form-data; name="purpose"\r\n\r\nbatch\r\n--x--\r\n')  # fmt: skip
    headers = {"authorization": "Bearer sk-alice", "content-type": MULTIPART_X + charset}
    uploaded = engine_client.post(FILES, content=body, headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    name = uploaded.json()["filename"]
    assert (name[0], name[-6:]) == ("a", ".jsonl")
    assert name.isprintable()  # no control character
    assert name.encode("utf-8")  # no lone surrogate
    listed = engine_client.get(FILES, headers=headers)
    assert name in [f["filename"] for f in listed.json()["data"]]
    assert engine_client.delete(f"{FILES}/{uploaded.json()['id']}", headers=headers).is_success
