"""What the report says: throughput buckets, units, the SLO, the context; and compare's
refusal of two runs with nothing in common."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import NothingInCommon, compare
from bench.report import SLO, build, html, rate_series, summarise
from tests.unit.test_bench_tools import stream_sample


def test_a_steady_stream_is_steady_to_the_last_bucket() -> None:
    """10 requests/s for 23 s: every bucket says 10/s, the partial last one included."""
    ends = [n / 10 for n in range(1, 231)]
    mids, rates = rate_series(ends, 23.0, 5.0)
    assert rates == pytest.approx([10.0] * len(rates), rel=0.05)
    assert mids[-1] == pytest.approx(21.5)  # the last bucket is 20..23 s, divided by 3 s


def test_a_sliver_of_a_last_bucket_joins_the_one_before() -> None:
    ends = [n / 10 for n in range(1, 202)]  # 10/s for 20.1 s
    _mids, rates = rate_series(ends, 20.1, 5.0)
    assert len(rates) == 4
    assert rates == pytest.approx([10.0] * 4, rel=0.05)


def test_the_page_says_units_the_slo_in_words_and_what_was_run(tmp_path: Path) -> None:
    samples = [stream_sample(v, n * 100, 100 + n % 7, [10] * 5) for v in ("v1", "v2")
               for n in range(50)]  # fmt: skip
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    context = {"host": "http://gw:8000", "versions": ["v1", "v2"], "command": "weir bench run x"}
    results = build(path, tmp_path, SLO(500, 100), "t", context=context)
    page = (tmp_path / "report.html").read_text()
    for text in ("TTFT p50 (ms)", "throughput (req/s)", "goodput (req/s)", "errors (%)"):
        assert text in page
    assert "TTFT \u2264 500 ms and mean inter-token gap \u2264 100 ms" in page
    assert "{'ttft_ms'" not in page  # not a Python dict
    assert "http://gw:8000" in page
    assert "weir bench run x" in page
    assert "v1, v2" in page
    low, high = results["variants"]["v1"]["ttft_ms"]["p50_ci"]
    assert f"[{low:.1f}, {high:.1f}]" in page  # the interval results.json holds
    assert results["counting"] == {"samples": 100}
    assert json.loads((tmp_path / "results.json").read_text())["context"] == context


def test_locust_csv_count_is_explained_when_it_differs(tmp_path: Path) -> None:
    samples = [stream_sample("g", n * 100, 100, [10]) for n in range(20)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "locust_stats.csv").write_text(
        "Type,Name,Request Count\nSSE,chat-stream [g],19\nTTFT,ttft [g],19\n,Aggregated,38\n"
    )
    results = build(path, tmp_path, SLO(), "t")
    assert results["counting"]["locust_csv"] == 19
    assert "Locust's CSV counts 19" in results["counting"]["locust_note"]
    page = (tmp_path / "report.html").read_text()
    assert "CSV counts 19. The count above is the right one" in page


def test_html_escapes_what_the_run_carries() -> None:
    results = summarise([stream_sample("<b>", 0, 10, [1])], SLO())
    results["context"] = {"command": "<script>x</script>"}
    page = html(results, [], "t")
    assert "<script>x" not in page
    assert "&lt;script&gt;" in page


def test_compare_refuses_runs_with_no_variant_in_common(tmp_path: Path) -> None:
    a = summarise([stream_sample("v1", 0, 10, [1])], SLO())
    b = summarise([stream_sample("v2", 0, 10, [1])], SLO())
    with pytest.raises(NothingInCommon, match="A has v1, B has v2"):
        compare(a, b)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    done = subprocess.run(
        [sys.executable, "-m", "bench.compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "no variant in common" in done.stderr
