"""``weir bench ui``: Locust's web UI with the suite, and its TTFT / ITL tab filled from
Locust's own stats while a swarm started from the UI streams from the mock engine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.procs import free_port, start, stop_all, wait_for
from tests.bench_targets import mock_engine


def test_the_streams_tab_fills_while_the_swarm_runs(tmp_path: Path) -> None:
    with mock_engine(tmp_path, "--chunks", "4", "--interval-ms", "5") as engine:
        port = free_port()
        command = [
            sys.executable, "-m", "serving.cli", "bench", "ui", "--host", engine,
            "--model", "mock", "--versions", "v1,v2", "--web-port", str(port),
            "--out", str(tmp_path / "ui"),
        ]  # fmt: skip
        ui: subprocess.Popen[bytes] = start(command, tmp_path / "ui.log")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/", 60)
            page = httpx.get(f"{base}/").text
            assert "TTFT / ITL" in page  # the tab is declared to the UI
            started = httpx.post(
                f"{base}/swarm", data={"user_count": 2, "spawn_rate": 2, "host": engine}
            )
            assert started.json()["success"], started.text
            deadline = time.monotonic() + 60
            rows: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                stats = httpx.get(f"{base}/stats/requests").json()
                tab = {t["key"]: t["data"] for t in stats.get("extended_stats", [])}
                rows = tab.get("weir-streams", [])
                if len(rows) == 2 and all(int(str(r.get("streams", 0))) >= 5 for r in rows):
                    break
                time.sleep(0.5)
            assert [r["variant"] for r in rows] == ["v1", "v2"], rows
            for row in rows:
                assert row["failures"] == 0
                assert float(str(row["ttft_p50"])) > 0
                assert float(str(row["e2e_p99"])) > 0
            assert httpx.get(f"{base}/weir/streams").json()[0]["variant"] == "v1"
            httpx.get(f"{base}/stop")
        finally:
            stop_all([ui])
