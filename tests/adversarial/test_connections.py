"""Connections are bounded before any key is checked: the head's size (431), the time to
send the head and the body (408), and the connections one client address may hold (429).

The real gateway (keys on, a fake engine) served by uvicorn with the guarded protocol on a
real socket in a thread, as ``weir serve`` runs it; clients are raw sockets, since no HTTP
client sends a 20 MB header or one byte every 200 ms on purpose.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import psutil
import pytest
import uvicorn
from pydantic import SecretStr

from models.engines.fleet import Fleet, Replica
from models.types import ReplicaKey
from serving.http import connection_guard
from serving.http.connection_guard import GuardedHttpTools
from serving.settings import GatewayConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate

KEY = "sk-connection-tests"
LIMITS = {
    "max_header_bytes": 16 * 1024,
    "header_timeout_s": 0.6,
    "body_timeout_s": 0.6,
    "max_connections_per_client": 8,
}
CHAT = orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    from serving.http.app import create_app

    gateway = GatewayConfig(api_keys=[SecretStr(KEY)], port=0, **LIMITS)

    def fleet(_: object) -> Fleet:
        engine = FakeEngine()
        return Fleet([Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")])

    app = create_app(Settings(gateway=gateway), fleet_factory=fleet)
    connection_guard.configure(gateway)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=GuardedHttpTools, loop="asyncio", log_level="warning", timeout_keep_alive=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    connection_guard.configure(GatewayConfig())


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], Any]:
    """One whole response (the guard's close with content-length), parsed."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        part = conn.recv(65536)
        if not part:
            raise ConnectionError(f"closed before a response: {raw!r}")
        raw += part
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        part = conn.recv(65536)
        if not part:
            break
        body += part
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else None


def closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def request(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


def healthz_ms(port: int) -> float:
    started = time.perf_counter()
    with connect(port) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, _ = read_response(conn)
    assert status == 200
    return (time.perf_counter() - started) * 1000


def test_a_normal_request_and_keep_alive_still_work(port: int) -> None:
    with connect(port) as conn:
        for _ in range(3):  # three requests on one connection, a pause between them
            conn.sendall(request("/v1/chat/completions", CHAT))
            status, _, body = read_response(conn)
            assert status == 200, body
            validate("CreateChatCompletionResponse", body)
            time.sleep(LIMITS["header_timeout_s"] * 1.5)  # idle, not sending a head


def test_a_huge_header_is_431_before_it_is_buffered(port: int) -> None:
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    started = time.perf_counter()
    conns = [connect(port) for _ in range(5)]
    for conn in conns:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-junk: ")
    answers = []
    for conn in conns:
        sent = 0
        try:
            while sent < 20 * 1024 * 1024:  # 20 MB of one header, as the attacker sent
                conn.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed part way: what should happen
        answers.append(read_response(conn))
        conn.close()
    took = time.perf_counter() - started
    grown_mb = (process.memory_info().rss - before) / 2**20
    for status, headers, body in answers:
        assert status == 431
        assert headers["connection"] == "close"
        assert body["error"]["code"] == "request_header_too_large"
        validate("ErrorResponse", body)
    assert grown_mb < 20, f"RSS grew {grown_mb:.0f} MB for five 20 MB headers"
    assert took < 10
    assert healthz_ms(port) < 1000


def test_a_whole_head_over_the_limit_in_one_write_is_431(port: int) -> None:
    """A head that arrives complete in one read (here 20 KiB, under the socket's 64 KiB
    read) is held to the limit too, and its request never runs."""
    junk = b"x-junk: " + b"a" * (20 * 1024) + b"\r\n"
    head = request("/v1/chat/completions", CHAT)
    with connect(port) as conn:
        conn.sendall(head.replace(b"host: x\r\n", b"host: x\r\n" + junk, 1))
        status, headers, body = read_response(conn)
        assert status == 431, body
        assert headers["connection"] == "close"
        validate("ErrorResponse", body)
        assert body["error"]["code"] == "request_header_too_large"
        assert closed_by_server(conn)
    assert healthz_ms(port) < 1000


def test_a_connection_that_sends_nothing_is_closed_with_408(port: int) -> None:
    with connect(port) as conn:
        started = time.monotonic()
        status, _, body = read_response(conn)
        waited = time.monotonic() - started
        assert status == 408
        assert body["error"]["code"] == "request_timeout"
        assert "headers" in body["error"]["message"]
        assert LIMITS["header_timeout_s"] * 0.9 <= waited < LIMITS["header_timeout_s"] + 5
        assert closed_by_server(conn)


def test_a_head_sent_a_byte_at_a_time_is_cut_off(port: int) -> None:
    head = request("/v1/chat/completions", CHAT)
    with connect(port) as conn:
        started = time.monotonic()
        status = None
        for byte in head:
            try:
                conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
            if time.monotonic() - started > LIMITS["header_timeout_s"] + 1:
                break
        status, _, body = read_response(conn)
        assert status == 408
        assert body["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < LIMITS["header_timeout_s"] + 5


def test_a_body_that_never_finishes_is_408_and_the_request_never_runs(port: int) -> None:
    with connect(port) as conn:
        head = request("/v1/chat/completions", CHAT)
        conn.sendall(head[: len(head) - len(CHAT) + 5])  # the head and five bytes of body
        status, _, body = read_response(conn)
        assert status == 408
        assert "body" in body["error"]["message"]
        assert closed_by_server(conn)
    assert healthz_ms(port) < 1000


def test_one_address_holds_a_bounded_number_of_connections(port: int) -> None:
    cap = int(LIMITS["max_connections_per_client"])
    held = [connect(port) for _ in range(cap)]
    try:
        deadline = time.monotonic() + 10  # polled: the server has accepted and counted them
        while GuardedHttpTools.open_by_client["127.0.0.1"] < cap:
            assert time.monotonic() < deadline, GuardedHttpTools.open_by_client
            time.sleep(0.01)
        with connect(port) as extra:
            status, headers, body = read_response(extra)
            assert status == 429
            assert body["error"]["code"] == "too_many_connections"
            assert headers["retry-after"] == "1"
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 5  # the server counts them closed
    while True:
        try:
            assert healthz_ms(port) < 1000
            break
        except (AssertionError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
