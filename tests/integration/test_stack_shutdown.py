"""Ctrl-C stops the gateway and every engine: no process is left behind. Runs last."""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.stack import Stack, alive

pytestmark = pytest.mark.integration


def test_ctrl_c_leaves_no_engine_process(stack: Stack) -> None:
    assert len(stack.tree()) >= 4  # two guards, two engines (plus vLLM's workers)
    # uvicorn re-raises the SIGINT after its graceful shutdown, as Ctrl-C in a shell expects
    assert stack.stop() in (0, -signal.SIGINT)
    deadline = time.monotonic() + 15
    while alive(stack.descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(stack.descendants) == []
    log = stack.log_path.read_text()
    assert "stopping engines" in log
    assert "Application shutdown complete" in log
