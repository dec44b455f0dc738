"""The sweep's rules on scripted outcomes: the stopping rule, the chosen rate, the verdict."""

from __future__ import annotations

import pytest

from bench.sweep import Point, Search, decisive_rate, holds, verdict, wilson


def point(version: str, rate: float, met: int, requests: int = 100, repeat: int = 1) -> Point:
    return Point(version, rate, repeat, requests, met, rate, met / 30, {}, {}, {}, {}, "")


def test_given_rates_stop_at_the_first_that_fails() -> None:
    search = Search(rates=[1, 2, 4, 8, 16])
    seen = []
    while (rate := search.next_rate()) is not None:
        seen.append(rate)
        search.record(rate, held=rate < 8)
    assert seen == [1, 2, 4, 8]  # 16 is never sent: past saturation it only queues more
    assert search.chosen() == 4


def test_auto_doubles_then_bisects_between_the_last_held_and_the_first_failed() -> None:
    capacity = 11.0
    search = Search(start=1, max_rate=64, refine=2)
    seen = []
    while (rate := search.next_rate()) is not None:
        seen.append(rate)
        search.record(rate, held=rate <= capacity)
    assert seen == [1, 2, 4, 8, 16, 12, 10]  # x2 until 16 fails, then (8+16)/2, (8+12)/2
    assert search.chosen() == 10


def test_auto_stops_at_the_max_rate_and_none_held_is_none() -> None:
    search = Search(start=1, max_rate=4)
    while (rate := search.next_rate()) is not None:
        search.record(rate, held=True)
    assert search.passed == [1, 2, 4]
    assert search.chosen() == 4
    nothing = Search(rates=[1, 2])
    nothing.record(1, held=False)
    assert nothing.next_rate() is None
    assert nothing.chosen() is None


def test_holds_pools_repeats_against_the_target() -> None:
    assert holds([point("v", 4, 95), point("v", 4, 87, repeat=2)], 0.9)  # 182/200
    assert not holds([point("v", 4, 95), point("v", 4, 80, repeat=2)], 0.9)  # 175/200
    assert not holds([], 0.9)


def test_wilson_interval() -> None:
    low, high = wilson(90, 100)
    assert low == pytest.approx(0.8256, abs=1e-3)
    assert high == pytest.approx(0.9448, abs=1e-3)
    assert wilson(0, 20)[0] == 0.0
    assert wilson(20, 20)[1] == 1.0


def test_a_clear_difference_is_called_and_names_the_decisive_rate() -> None:
    points = [point(v, r, 99) for v in ("v1", "v2") for r in (1, 2)]
    points += [point("v1", 4, 30), point("v1", 4, 28, repeat=2)]  # v1 fails 4/s twice
    points += [point("v2", 4, 98), point("v2", 4, 97, repeat=2), point("v2", 8, 10)]
    chosen = {"v1": 2.0, "v2": 4.0}
    assert decisive_rate(points, "v1", 2.0) == 4
    text = verdict(points, chosen, 0.9, repeats=2)
    assert "v2 holds more load than v1: 4/s against 2/s" in text
    assert "at 4/s" in text
    assert "noise" not in text


def test_overlapping_attainment_at_the_decisive_rate_is_within_noise() -> None:
    points = [point(v, 1, 99) for v in ("v1", "v2")]
    points += [point("v1", 2, 91), point("v1", 2, 92, repeat=2)]  # v1 just holds 2/s
    points += [point("v2", 2, 89), point("v2", 2, 93, repeat=2)]  # v2 pooled 182/200 holds too
    points += [point("v1", 4, 88), point("v1", 4, 91, repeat=2)]  # v1 fails 4/s, barely
    points += [point("v2", 4, 90), point("v2", 4, 92, repeat=2)]  # v2 holds 4/s, barely
    points += [point("v2", 8, 20)]
    text = verdict(points, {"v1": 2.0, "v2": 4.0}, 0.9, repeats=2)
    assert "v2 vs v1: within the noise of repeated points" in text


def test_equal_rates_say_so() -> None:
    points = [point(v, 1, 99) for v in ("a", "b")]
    assert "the same highest rate (1/s)" in verdict(points, {"a": 1.0, "b": 1.0}, 0.9, 1)


def test_neither_holding_any_rate_says_so() -> None:
    points = [point(v, 1, 3) for v in ("a", "b")]
    assert "neither held the SLO" in verdict(points, {"a": None, "b": None}, 0.9, 1)
