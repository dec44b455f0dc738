"""Servers started by the tests survive losing the race for a port found free."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.procs import gateway_config, stop_all, wait_for
from tests import ports
from tests.redis_server import RedisServer


@pytest.fixture
def holder() -> Iterator[socket.socket]:
    """A port someone else took between our finding it free and our server binding it:
    it listens (and accepts nothing), as another test's server would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_redis_server_moves_to_another_port_when_its_first_is_taken(
    tmp_path: Path, holder: socket.socket
) -> None:
    taken = holder.getsockname()[1]
    server = RedisServer(tmp_path, pick=ports.taken_first(holder))
    try:
        assert server.port != taken
        assert ports.listens(server.process.pid, server.port)
        assert "Address already in use" in (tmp_path / f"redis-{taken}.log").read_text()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(b"PING\r\n")
            assert conn.recv(16).startswith(b"+PONG")
    finally:
        server.stop()


def test_a_restart_on_a_taken_port_fails_instead_of_moving(
    tmp_path: Path, holder: socket.socket
) -> None:
    """Its clients know only that port: a restart elsewhere would lose them."""
    with pytest.raises(RuntimeError, match="taken"):
        RedisServer(tmp_path, port=holder.getsockname()[1])


def test_a_gateway_moves_to_another_port_when_its_first_is_taken(
    tmp_path: Path, holder: socket.socket
) -> None:
    taken = holder.getsockname()[1]
    engine, mock = ports.mock_engine(tmp_path)
    procs = [engine]
    try:
        gateway, base = ports.gateway(
            lambda port: gateway_config(port, mock, tmp_path / "engines"),
            tmp_path,
            "gateway",
            pick=ports.taken_first(holder),
        )
        procs.append(gateway)
        port = int(base.rsplit(":", 1)[1])
        assert port != taken
        assert ports.listens(gateway.pid, port)
        wait_for(f"{base}/readyz", 60)
        answer = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    finally:
        stop_all(procs)


def test_a_server_that_fails_for_another_reason_is_not_retried(tmp_path: Path) -> None:
    tried: list[int] = []

    def start(port: int) -> object:
        tried.append(port)
        raise RuntimeError("no such binary")

    with pytest.raises(RuntimeError, match="no such binary"):
        ports.on_free_port(start)
    assert len(tried) == 1


def test_ports_taken_every_time_give_up_with_the_ports_tried() -> None:
    tried: list[int] = []

    def start(port: int) -> object:
        tried.append(port)
        raise ports.PortTaken(port)

    with pytest.raises(RuntimeError, match="no free port after 5 tries"):
        ports.on_free_port(start)
    assert len(tried) == ports.ATTEMPTS
