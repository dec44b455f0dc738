"""Compare two runs' results.json: what changed, and whether it is beyond the noise.

A difference counts only when the two bootstrap 95% intervals of that percentile do not
overlap; otherwise it is printed as within noise.

    python -m bench.compare A/results.json B/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

METRICS = (("ttft_ms", "TTFT"), ("inter_token_ms", "inter-token"), ("e2e_ms", "end to end"))


def table_for(results: dict[str, Any]) -> Table:
    table = Table(title="per variant")
    for column in ("variant", "req/s", "out tok/s", "goodput req/s", "errors (%)"):
        table.add_column(column, justify="right")
    for _, name in METRICS:
        table.add_column(f"{name} p50 (ms)", justify="right")
        table.add_column(f"{name} p99 (ms)", justify="right")
    for label, v in sorted(results["variants"].items()):
        row = [label, f"{v['request_throughput_rps']:.2f}", f"{v['output_tokens_per_s']:.1f}"]
        row += [f"{v['goodput_rps']:.2f}", f"{v['error_rate']:.1%}"]
        for metric, _ in METRICS:
            row += [
                f"{v[metric].get('p50', float('nan')):.1f}",
                f"{v[metric].get('p99', float('nan')):.1f}",
            ]
        table.add_row(*row)
    return table


def _verdict(a: dict[str, Any], b: dict[str, Any], q: int) -> str:
    ca, cb = a.get(f"p{q}_ci"), b.get(f"p{q}_ci")
    if not ca or not cb:
        return "n/a"
    if ca[1] < cb[0]:
        return "slower"
    if cb[1] < ca[0]:
        return "faster"
    return "within noise"


class NothingInCommon(ValueError):
    """Two runs with no variant in common: there is nothing to compare."""


def compare(a: dict[str, Any], b: dict[str, Any]) -> Table:
    common = set(a["variants"]) & set(b["variants"])
    if not common:
        raise NothingInCommon(
            f"no variant in common: A has {', '.join(sorted(a['variants'])) or 'none'}, "
            f"B has {', '.join(sorted(b['variants'])) or 'none'} (run both with the same "
            "--versions or --label)"
        )
    table = Table(title="B against A")
    for column in ("variant", "metric", "A", "B", "change", "verdict"):
        table.add_column(column, justify="right")
    for label in sorted(common):
        va, vb = a["variants"][label], b["variants"][label]
        for key in ("request_throughput_rps", "output_tokens_per_s", "goodput_rps"):
            change = (vb[key] - va[key]) / va[key] if va[key] else 0.0
            table.add_row(label, key, f"{va[key]:.2f}", f"{vb[key]:.2f}", f"{change:+.1%}", "")
        for metric, name in METRICS:
            for q in (50, 99):
                xa, xb = va[metric].get(f"p{q}"), vb[metric].get(f"p{q}")
                if xa is None or xb is None:
                    continue
                change = (xb - xa) / xa if xa else 0.0
                verdict = _verdict(va[metric], vb[metric], q)
                table.add_row(
                    label, f"{name} p{q}", f"{xa:.1f}", f"{xb:.1f}", f"{change:+.1%}", verdict
                )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    try:
        table = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    except NothingInCommon as exc:
        raise SystemExit(f"weir bench compare: {exc}") from None
    Console(width=max(120, Console().width)).print(table)


if __name__ == "__main__":
    main()
