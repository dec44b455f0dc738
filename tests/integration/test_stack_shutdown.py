"""Ctrl-C stops the gateway and every engine: no process is left behind. Runs last."""

from __future__ import annotations

import time

import pytest

from tests.integration.stack import Stack, alive

pytestmark = pytest.mark.integration


def test_ctrl_c_leaves_no_engine_process(stack: Stack) -> None:
    assert len(stack.tree()) >= 6  # three guards, three engines (plus vLLM's workers)
    assert stack.stop() == 130  # the shell's code for "ended by Ctrl-C", after a clean stop
    deadline = time.monotonic() + 15
    while alive(stack.descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(stack.descendants) == []
    log = stack.log_path.read_text()
    assert "stopping engines" in log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
