"""The benchmark suite's pure parts: payloads, shapes, the report and the comparison."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from bench import payloads, shapes
from bench.compare import compare
from bench.report import SLO, grouped, summarise

MS = 1_000_000


@pytest.mark.parametrize("mix", sorted(payloads.GENERATORS))
def test_payloads_are_deterministic_for_a_seed(mix: str) -> None:
    first = list(itertools.islice(payloads.make(mix, 7), 20))
    again = list(itertools.islice(payloads.make(mix, 7), 20))
    other = list(itertools.islice(payloads.make(mix, 8), 20))
    assert first == again
    assert first != other
    body = first[0].chat_body("m", stream=True)
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] >= 1


def test_sharegpt_mix_fits_a_2048_context() -> None:
    rows = list(itertools.islice(payloads.sharegpt(1), 500))
    longest = max(len(p.prompt_text.split()) + p.max_tokens for p in rows)
    assert longest < 2000
    assert len({p.max_tokens for p in rows}) > 50  # a real spread, not one size


def test_cache_mix_repeats_a_few_prompts_at_temperature_zero() -> None:
    rows = list(itertools.islice(payloads.cache_heavy(3, distinct=4), 100))
    assert len({p.prompt_text for p in rows}) == 4
    assert {p.temperature for p in rows} == {0.0}


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_shapes_cover_the_duration_and_reach_the_users(name: str) -> None:
    table = shapes.stages(name, 16, 100)
    assert table[-1].until_s == 100
    assert max(stage.users for stage in table) == 16
    assert [s.until_s for s in table] == sorted(s.until_s for s in table)


def test_tick_walks_through_the_table() -> None:
    table = shapes.step(8, 40, steps=4)
    seen = [shapes.tick(table, now) for now in (0, 15, 25, 35, 45)]
    assert seen == [(2, 8), (4, 8), (6, 8), (8, 8), None]


def stream_sample(
    variant: str, start_ms: int, ttft_ms: float, gaps_ms: list[float], error: str | None = None
) -> dict[str, Any]:
    return {
        "kind": "chat-stream", "variant": variant, "start_wall_ns": start_ms * MS,
        "status": 200 if error is None else 503, "error": error,
        "ttft_ns": int(ttft_ms * MS), "gaps_ns": [int(g * MS) for g in gaps_ms],
        "e2e_ns": int((ttft_ms + sum(gaps_ms)) * MS), "prompt_tokens": 10,
        "completion_tokens": len(gaps_ms) + 1,
    }  # fmt: skip


def test_summary_counts_goodput_against_the_slo() -> None:
    samples = [
        stream_sample("v1", 0, 100, [10, 10]),  # meets the SLO
        stream_sample("v1", 0, 1500, [10, 10]),  # TTFT too slow
        stream_sample("v1", 0, 100, [300, 300]),  # gaps too slow
        stream_sample("v1", 0, 100, [10], error="engine_error"),
        stream_sample("v2", 0, 50, [5, 5, 5]),
    ]
    results = summarise(samples, SLO(ttft_ms=1000, itl_ms=200))
    v1, v2 = results["variants"]["v1"], results["variants"]["v2"]
    window = results["window_s"]
    assert v1["requests"] == 4
    assert v1["ok"] == 3
    assert v1["errors"] == {"engine_error": 1}
    assert v1["goodput_rps"] == pytest.approx(1 / window)
    assert v1["output_tokens_per_s"] == pytest.approx(3 * 3 / window)
    assert v2["ttft_ms"]["p50"] == pytest.approx(50)
    assert v2["inter_token_ms"]["count"] == 3


def test_mixed_kinds_are_reported_apart() -> None:
    plain = {
        "kind": "embeddings",
        "variant": "g",
        "start_wall_ns": 0,
        "status": 200,
        "error": None,
        "e2e_ns": 5 * MS,
    }
    groups = grouped([stream_sample("g", 0, 10, [1]), plain])
    assert set(groups) == {"g/chat-stream", "g/embeddings"}


def test_compare_calls_identical_runs_within_noise_and_a_shift_slower() -> None:
    base = [stream_sample("v", n, 100 + n % 7, [10 + n % 3] * 5) for n in range(200)]
    slower = [stream_sample("v", n, 200 + n % 7, [10 + n % 3] * 5) for n in range(200)]
    a, b = summarise(base, SLO()), summarise(slower, SLO())
    rows = compare(a, a).columns[-1]._cells
    assert set(rows) <= {"", "within noise"}
    verdicts = dict(
        zip(compare(a, b).columns[1]._cells, compare(a, b).columns[-1]._cells, strict=True)
    )
    assert verdicts["TTFT p50"] == "slower"
    assert verdicts["inter-token p50"] == "within noise"
