"""A short headless Locust run against the real stack gives valid results and a report.

The run pins both the gateway and the engine behind it (``--compare-host``), so it also
exercises the per-variant reporting the version comparisons rely on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def test_short_run_writes_results_and_report(stack: Stack, tmp_path: Path) -> None:
    engines = httpx.get(f"{stack.base_url}/weir/engines").json()["data"]
    engine = next(e["base_url"] for e in engines if e["model"] == "smollm2")
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "serving.cli", "bench", "run", "--scenario", "stream-chat",
        "--users", "2", "--duration", "20", "--host", stack.base_url, "--compare-host", engine,
        "--mix", "sharegpt", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"gateway", "direct"}
    for label, variant in results["variants"].items():
        assert variant["ok"] >= 1, (label, variant)
        assert variant["error_rate"] == 0, variant["errors"]
        assert variant["output_tokens_per_s"] > 0
        assert variant["ttft_ms"]["p50"] > 0
        assert variant["inter_token_ms"]["count"] > 0
        lo, hi = variant["e2e_ms"]["p50_ci"]
        assert lo <= variant["e2e_ms"]["p50"] <= hi
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(isinstance(s["e2e_ns"], int) for s in samples)  # raw, unrounded
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    same = str(out / "results.json")
    compare = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "compare", same, same],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert compare.returncode == 0, compare.stderr
    assert "within noise" in compare.stdout
