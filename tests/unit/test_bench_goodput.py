"""The goodput benchmark's arithmetic and its mixed rounds (against in-process mocks)."""

from __future__ import annotations

import math

import pytest
from aiohttp.test_utils import TestServer

from bench.mock_engine import make_app
from bench.throughput import Round, interval, run_mixed, summarize

pytestmark = pytest.mark.anyio


def rounds_for(pairs: list[tuple[float, float]]) -> list[Round]:
    """(direct tok/s, gateway tok/s) pairs as rounds of 100 s, the order alternating."""
    out = []
    for n, (direct, gateway) in enumerate(pairs):
        pair = [
            Round("direct", 8, 8, int(direct * 100), 100.0, 0),
            Round("gateway", 8, 8, int(gateway * 100), 100.0, 1),
        ]
        out += pair if n % 2 == 0 else pair[::-1]
    return out


def test_pairs_give_ratios_in_run_order() -> None:
    rows = summarize(rounds_for([(100, 90), (50, 50), (80, 100)]), 8)
    assert [round(r, 3) for r in rows["pair_ratios"]] == [0.9, 1.0, 1.25]
    assert rows["ratio"] == pytest.approx(1.0)  # the median pair, not a ratio of medians
    assert rows["direct_tok_s"] == 80
    assert rows["gateway_tok_s"] == 90
    assert rows["direct_spread"] == pytest.approx((100 - 50) / 80)
    assert rows["errors"] == 3
    low, high = rows["ratio_ci95"]
    geometric = math.exp(sum(math.log(r) for r in rows["pair_ratios"]) / 3)
    assert low < geometric < high


def test_interval_narrows_with_agreeing_pairs() -> None:
    wide = interval([0.8, 1.2, 0.9, 1.1])
    narrow = interval([0.99, 1.01, 0.995, 1.005])
    assert wide[0] < narrow[0] < 1 < narrow[1] < wide[1]
    assert interval([1.0]) == (0.0, 0.0)  # one pair says nothing about spread


async def test_mixed_round_splits_the_streams_in_halves() -> None:
    """Each target gets half the workers; the halves swap with the round's parity."""
    slow = TestServer(make_app(chunks=4, interval_s=0.02))
    fast = TestServer(make_app(chunks=4, interval_s=0.0))
    await slow.start_server()
    await fast.start_server()
    try:
        targets = {"direct": str(fast.make_url("")), "gateway": str(slow.make_url(""))}
        for flip in (0, 1):
            direct, gateway = await run_mixed(targets, "smollm2", 4, 8, 16, flip)
            assert (direct.target, gateway.target) == ("direct", "gateway")
            assert direct.requests == gateway.requests == 4  # two workers x two requests each
            # tokens come from the mock's usage: 4 chunks per stream
            assert direct.output_tokens == gateway.output_tokens == 16
            assert direct.errors == gateway.errors == 0
            assert gateway.seconds > direct.seconds  # the slow mock's streams took longer
            assert direct.tokens_per_s > gateway.tokens_per_s
    finally:
        await slow.close()
        await fast.close()
