"""The reports as a person sees them: opened in headless Chromium (Debian's ``chromium``,
driven by Playwright), with no console error, every plot drawn, a screenshot beside them.

The run behind the report is the suite's own against a real ``weir serve`` (with an API
key) in front of the mock engine, and the engine alone as the compare host: Weir and the
engine in one report. The sweep is two pinned versions against a mock whose streams
queue past 4 at a time, so the curve has a knee.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.run import check_endpoint
from tests.bench_targets import bench, gateway, mock_engine

KEY = "sk-bench-browser-test"


def chromium() -> str:
    found = os.environ.get("WEIR_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    if not found:
        pytest.fail(
            "no Chromium: apt-get install -y --no-install-recommends chromium "
            "(or set WEIR_CHROMIUM to a Chromium binary); .ci/run installs it"
        )
    return found


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    logs = tmp_path_factory.mktemp("targets")
    out = tmp_path_factory.mktemp("reports")
    with (
        mock_engine(logs, "--chunks", "8", "--interval-ms", "5") as engine,
        gateway(engine, logs, KEY) as weir,
        mock_engine(logs, "--chunks", "6", "--interval-ms", "10", "--stream-capacity", "4") as busy,
    ):
        assert check_endpoint(weir, "smollm2", "") is not None  # the key is asked for
        assert check_endpoint(weir, "smollm2", KEY) is None
        os.environ["WEIR_BENCH_API_KEY"] = KEY
        try:
            done = bench(
                "run", "--scenario", "stream-chat", "--users", "4", "--duration", "5",
                "--host", weir, "--label", "weir", "--compare-host", engine,
                "--compare-model", "mock", "--compare-label", "engine", "--out", str(out / "run"),
            )  # fmt: skip
        finally:
            del os.environ["WEIR_BENCH_API_KEY"]
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        swept = bench(
            "sweep", "--versions", "v1,v2", "--host", busy, "--model", "mock", "--rates", "8,200",
            "--duration", "3", "--repeats", "1", "--slo-ttft-ms", "300", "--slo-itl-ms", "100",
            "--out", str(out / "sweep"),
        )  # fmt: skip
        assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    return {"run": out / "run" / "report.html", "sweep": out / "sweep" / "sweep.html"}


def test_weir_and_the_engine_alone_in_one_report(reports: dict[str, Path]) -> None:
    results = json.loads(reports["run"].with_name("results.json").read_text())
    assert set(results["variants"]) == {"weir", "engine"}
    for variant in results["variants"].values():
        assert variant["ok"] > 0
        assert variant["error_rate"] == 0, variant["errors"]
        assert variant["ttft_ms"]["p50"] > 0
    assert results["context"]["compare_host"].startswith("http://127.0.0.1:")


def test_the_sweep_chooses_a_rate_per_version(reports: dict[str, Path]) -> None:
    summary = json.loads(reports["sweep"].with_name("sweep.json").read_text())
    # 4 streams of 60 ms at a time hold about 66/s: 8/s holds the SLO, 200/s queues
    assert summary["chosen"] == {"v1": 8.0, "v2": 8.0}
    assert {(p["version"], p["rate"]) for p in summary["points"]} == {
        (v, r) for v in ("v1", "v2") for r in (8.0, 200.0)
    }
    assert "the same highest rate (8/s)" in summary["verdict"]


def look(page_path: Path, browser: Any) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(page_path.as_uri())
    page.wait_for_load_state("load")
    state: dict[str, Any] = page.evaluate(
        """() => ({
            plots: [...document.querySelectorAll('img.plot')].map(i => ({
                alt: i.alt, complete: i.complete, width: i.naturalWidth,
                shown: i.getBoundingClientRect().width})),
            headers: [...document.querySelectorAll('th')].map(t => t.textContent),
            text: document.body.innerText,
        })"""
    )
    shot = page_path.with_suffix(".png")
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    state["problems"] = problems
    state["screenshot"] = shot
    return state


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), headless=True)
        yield launched
        launched.close()


def test_the_run_report_in_chromium(reports: dict[str, Path], browser: Any) -> None:
    state = look(reports["run"], browser)
    assert state["problems"] == []
    captions = [p["alt"] for p in state["plots"]]
    assert captions == [
        "Latency distributions (CDF), per variant",
        "Percentiles side by side",
        "Throughput and latency over time",
    ]
    assert all(p["complete"] and p["width"] > 500 and p["shown"] > 300 for p in state["plots"])
    assert "TTFT p50 (ms)" in state["headers"]
    assert "throughput (req/s)" in state["headers"]
    assert "TTFT p99 (ms) [95% CI]" in state["headers"]
    assert "TTFT \u2264 1000 ms" in state["text"]
    assert state["screenshot"].stat().st_size > 50_000
    print(f"screenshot: {state['screenshot']}")


def test_the_sweep_report_in_chromium(reports: dict[str, Path], browser: Any) -> None:
    state = look(reports["sweep"], browser)
    assert state["problems"] == []
    assert len(state["plots"]) == 1
    assert all(p["complete"] and p["width"] > 500 for p in state["plots"])
    assert "rate (req/s)" in state["headers"]
    assert "met SLO (%)" in state["headers"]
    assert "Verdict:" in state["text"]
    assert state["screenshot"].stat().st_size > 50_000
