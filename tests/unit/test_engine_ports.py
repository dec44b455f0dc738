"""Local engines' ports: outside the kernel's ephemeral range, where outgoing
connections take their source ports (one taken while an engine loads fails it on every
restart)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from models.engines import launcher


def test_ports_are_below_the_ephemeral_range_free_and_distinct(tmp_path: Path) -> None:
    ranges = tmp_path / "range"
    ranges.write_text("32768\t60999\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "EPHEMERAL_RANGE", ranges)
        ports = [launcher.free_port() for _ in range(50)]
    assert all(launcher.ENGINE_PORTS[0] <= p < 32768 for p in ports)
    assert len(set(ports)) == len(ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: nothing holds it


def test_a_port_held_by_a_server_is_not_given(tmp_path: Path) -> None:
    ranges = tmp_path / "range"
    ranges.write_text("20003 60999")  # room for three ports: 20000-20002
    held = []
    try:
        for port in (20000, 20001):  # a server holds two of them
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append(sock)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launcher, "EPHEMERAL_RANGE", ranges)
            patch.setattr(launcher, "_handed_out", set())
            assert launcher.free_port() == 20002
    finally:
        for sock in held:
            sock.close()


def test_a_host_whose_range_leaves_no_room_gets_any_free_port(tmp_path: Path) -> None:
    ranges = tmp_path / "range"
    ranges.write_text("1024 65535")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "EPHEMERAL_RANGE", ranges)
        port = launcher.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
