"""Money budgets are exact across gateway processes: two ``weir serve`` sharing one real
Redis, 200 clients at once against a $1.00 budget (``bench.budget_exact``; the 20-run
figure comes from ``python -m bench.budget_exact``, this runs three).

A mock engine stands in for vLLM (every answer takes 3 s, so every admission is decided
before money is given back); the gateways, their tokenizer, the key store, the Lua
scripts and the ledgers are the real ones, reached over HTTP.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from bench.budget_exact import BUDGET_NANO, gateway_toml, mock_args, run
from bench.procs import stop_all, wait_for
from tests import ports
from tests.redis_server import RedisServer

RUNS = 3


def test_budget_is_never_overspent_and_refuses_only_what_does_not_fit(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    engine, mock = ports.mock_engine(tmp_path, *mock_args())
    procs = [engine]
    try:
        wait_for(f"http://127.0.0.1:{mock}/health", 30)
        urls = []
        for name in ("a", "b"):
            toml = partial(gateway_toml, redis_url=server.url, mock=mock, work=tmp_path, name=name)
            # each its own ledger, as its weir.toml says (the session's env names one for all)
            env = {"WEIR_LEDGER__PATH": str(tmp_path / f"ledger-{name}.db"),
                   "WEIR_LEDGER__SPILL_DIR": str(tmp_path / f"spill-{name}")}  # fmt: skip
            gateway, url = ports.gateway(toml, tmp_path, f"gateway-{name}", env=env)
            procs.append(gateway)
            urls.append(url)
        for url in urls:
            wait_for(f"{url}/readyz", 120)
        result = run(urls, server.url, RUNS)
    finally:
        stop_all(procs)
        server.stop()
    runs = result["runs"]
    assert [r["wrong"] for r in runs] == [[]] * RUNS, runs
    for r in runs:
        assert r["reserved_nano"] <= BUDGET_NANO
        assert r["smallest_refused_nano"] > BUDGET_NANO - r["reserved_nano"]  # none would fit
        assert r["spent_nano"] == r["usage_cost_nano"] == r["ledger_cost_nano"] <= BUDGET_NANO
        assert r["admitted"] + r["refused"] == r["ledger_rows"] == 200
        assert r["admitted"] > 0
        assert r["refused"] > 0
    print(
        "\nadmitted/refused, reserved and spent per run ($1.00, 200 clients, 2 gateways):",
        [(r["admitted"], r["refused"], r["reserved_nano"], r["spent_nano"]) for r in runs],
    )
