"""A real engine killed with SIGKILL is restarted by the supervisor and serves again."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def chat_engine_pid(stack: Stack) -> int:
    for pid in stack.tree():
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        # the engine's own command line, not its guard's (which contains it after "--")
        if cmdline[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "smollm2" in cmdline:
            return pid
    raise AssertionError("no chat engine process found")


def test_killed_chat_engine_comes_back(stack: Stack) -> None:
    victim = chat_engine_pid(stack)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{stack.base_url}/readyz").status_code == 503:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("readiness never noticed the dead engine")
    stack.wait_ready(timeout_s=300)
    assert chat_engine_pid(stack) != victim
    engines = httpx.get(f"{stack.base_url}/weir/engines").json()["data"]
    assert [e["restarts"] for e in engines if e["model"] == "smollm2"] == [1]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert (
        httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60).status_code
        == 200
    )
