"""SLO sweep: per version, the highest Poisson arrival rate whose goodput holds the SLO.

    weir bench sweep --versions v1,v2 --slo-ttft-ms 500 --slo-itl-ms 100 \\
        [--rates 1,2,4,8 | --auto [--start-rate 1 --max-rate 64 --refine 2]] \\
        [--duration 30 --repeats 2 --attainment 0.9 --warmup 20] [--processes N] --host URL

Each point is an open-loop run (``bench.run``'s ``open-loop`` scenario: Poisson arrivals,
whatever the responses do) pinned to one version. A point *holds* the SLO when at least
``--attainment`` of its requests met it (TTFT and mean inter-token gap; failed, dropped and
cut-off requests count as missed): goodput is then at least that share of the offered
load. Repeats of a rate are pooled.

Stopping rule: a version stops at its first rate that does not hold (load past saturation
only queues more). ``--rates`` walks the given rates upward; ``--auto`` doubles from
``--start-rate`` until a rate fails (or ``--max-rate``), then bisects between the last rate
that held and the first that failed ``--refine`` times. Versions are interleaved at each
step, their order alternating, so a drifting engine affects both alike.

The verdict compares versions at the *decisive* rate, the first one the weaker version
failed: when the two versions' attainment there (pooled Wilson 95% intervals, and the
spread of the repeats) overlaps, the difference is within the noise of repeated points.
Writes ``sweep.json`` and ``sweep.html`` (the curve: rate against TTFT/ITL percentiles,
goodput and attainment, versions side by side), and each point's own run beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import report

Z95 = 1.96


@dataclass
class Point:
    version: str
    rate: float
    repeat: int
    requests: int
    met: int
    achieved_rps: float
    goodput_rps: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: dict[str, int]
    path: str

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 0.0


def wilson(met: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal)."""
    if total == 0:
        return 0.0, 1.0
    p = met / total
    denominator = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(points: list[Point]) -> tuple[int, int]:
    return sum(p.met for p in points), sum(p.requests for p in points)


def holds(points: list[Point], target: float) -> bool:
    met, total = pooled(points)
    return total > 0 and met / total >= target


def _round(rate: float) -> float:
    """Two significant digits: rates a person can read and type again."""
    if rate <= 0:
        return rate
    digits = 1 - math.floor(math.log10(rate))
    return round(rate, digits)


@dataclass
class Search:
    """Where one version's sweep goes next, by the stopping rule."""

    rates: list[float] | None = None  # --rates; None for --auto
    start: float = 1.0
    factor: float = 2.0
    max_rate: float = 64.0
    refine: int = 2
    passed: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    refined: int = 0

    def next_rate(self) -> float | None:
        measured = set(self.passed) | set(self.failed)
        if self.rates is not None:
            if self.failed:
                return None
            left = [r for r in sorted(self.rates) if r not in measured]
            return left[0] if left else None
        if not self.failed:
            rate = _round(self.start * self.factor ** len(self.passed))
            return rate if rate <= self.max_rate else None
        if self.refined >= self.refine:
            return None
        low = max((r for r in self.passed if r < min(self.failed)), default=0.0)
        rate = _round((low + min(self.failed)) / 2)
        return None if rate in measured or rate <= low else rate

    def record(self, rate: float, held: bool) -> None:
        if self.rates is None and self.failed:
            self.refined += 1
        (self.passed if held else self.failed).append(rate)

    def chosen(self) -> float | None:
        """The highest rate that held below the first that failed (None: none held)."""
        ceiling = min(self.failed, default=math.inf)
        return max((r for r in self.passed if r < ceiling), default=None)


def at(points: list[Point], version: str, rate: float) -> list[Point]:
    return [p for p in points if p.version == version and p.rate == rate]


def decisive_rate(points: list[Point], weak: str, chosen_weak: float | None) -> float | None:
    """The first rate the weaker version failed (above its chosen rate)."""
    floor = chosen_weak or 0.0
    rates = sorted({p.rate for p in points if p.version == weak and p.rate > floor})
    return rates[0] if rates else None


def verdict(
    points: list[Point], chosen: Mapping[str, float | None], target: float, repeats: int
) -> str:
    versions = list(chosen)
    lines = []
    for version in versions:
        rate = chosen[version]
        lines.append(
            f"{version}: {'no rate held' if rate is None else f'holds {rate:g}/s'}"
            f" (at least {target:.0%} of requests within the SLO)"
        )
    if len(versions) < 2:
        return "; ".join(lines)
    base = versions[0]
    for other in versions[1:]:
        lines.append(_pair(points, base, other, chosen, target, repeats))
    return "; ".join(lines)


def _pair(
    points: list[Point],
    a: str,
    b: str,
    chosen: Mapping[str, float | None],
    target: float,
    repeats: int,
) -> str:
    ca, cb = chosen[a] or 0.0, chosen[b] or 0.0
    if chosen[a] is None and chosen[b] is None:
        return f"{a} and {b}: neither held the SLO at any rate tried (try lower --rates)"
    if ca == cb:
        return f"{a} and {b}: the same highest rate ({ca:g}/s) at this rate resolution"
    strong, weak = (a, b) if ca > cb else (b, a)
    rate = decisive_rate(points, weak, chosen[weak])
    if rate is None or not at(points, strong, rate):
        return f"{strong} held more, but the decisive rate was not measured for both"
    mine, theirs = at(points, strong, rate), at(points, weak, rate)
    band_s, band_w = wilson(*pooled(mine)), wilson(*pooled(theirs))
    spread_s = [p.attainment for p in mine]
    spread_w = [p.attainment for p in theirs]
    overlap = band_s[0] <= band_w[1] and band_w[0] <= band_s[1]
    disagree = any(x < target for x in spread_s) or any(x >= target for x in spread_w)
    figures = (
        f"at {rate:g}/s {strong} met the SLO for {_share(mine)} [{band_s[0]:.0%}, "
        f"{band_s[1]:.0%}] of requests, {weak} for {_share(theirs)} [{band_w[0]:.0%}, "
        f"{band_w[1]:.0%}] ({len(mine)} and {len(theirs)} repeats)"
    )
    if overlap or disagree:
        return (
            f"{strong} vs {weak}: within the noise of repeated points ({figures}); not a difference"
        )
    note = "" if repeats > 1 else " (one repeat: only the sampling noise is known)"
    return (
        f"{strong} holds more load than {weak}: {chosen[strong]:g}/s against "
        f"{chosen[weak] or 0:g}/s; {figures}{note}"
    )


def _share(points: list[Point]) -> str:
    met, total = pooled(points)
    return f"{met / total:.0%}" if total else "n/a"


def ms(stats: dict[str, Any], key: str) -> str:
    value = stats.get(key)
    return "n/a" if value is None else f"{value:.1f}"


def point_from(
    results: dict[str, Any], version: str, rate: float, repeat: int, path: Path, slo: report.SLO
) -> Point:
    samples = report.load(path / "samples.jsonl")
    met = sum(slo.met(s) for s in samples)
    variant = next(iter(results["variants"].values()))
    duration = float(results["context"]["options"]["duration"])

    def pick(stats: dict[str, Any]) -> dict[str, float]:
        return {f"p{q}": float(stats[f"p{q}"]) for q in (50, 90, 99) if f"p{q}" in stats}

    return Point(
        version=version,
        rate=rate,
        repeat=repeat,
        requests=len(samples),
        met=met,
        achieved_rps=len(samples) / duration,
        goodput_rps=met / duration,
        ttft_ms=pick(variant["ttft_ms"]),
        itl_ms=pick(variant["inter_token_ms"]),
        e2e_ms=pick(variant["e2e_ms"]),
        errors=dict(variant["errors"]),
        path=str(path),
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", default="", help="v1,v2: pinned as model@v (none: the host)")
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--label", default="", help="the host's name when no versions")
    parser.add_argument("--openai-strict", action="store_true")
    parser.add_argument("--mix", default="fixed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--slo-itl-ms", type=float, default=100.0)
    parser.add_argument("--attainment", type=float, default=0.9, help="share that must meet it")
    rates = parser.add_mutually_exclusive_group()
    rates.add_argument("--rates", default="", help="comma-separated arrivals per second")
    rates.add_argument("--auto", action="store_true", help="double, then bisect")
    parser.add_argument("--start-rate", type=float, default=1.0)
    parser.add_argument("--max-rate", type=float, default=64.0)
    parser.add_argument("--refine", type=int, default=2, help="--auto: bisection steps")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per point")
    parser.add_argument("--repeats", type=int, default=2, help="runs per rate and version")
    parser.add_argument("--processes", type=int, default=None, help="load processes per point")
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds of load per version at the lowest rate before the sweep, not counted "
        "(a fresh engine's first requests are slow)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results") / f"sweep-{time.strftime('%H%M%S')}"
    )
    return parser


def point_args(args: argparse.Namespace, version: str, rate: float, out: Path) -> Any:
    from bench import run

    argv = [
        "--scenario", "open-loop", "--rate", str(rate), "--duration", str(args.duration),
        "--host", args.host, "--model", args.model, "--mix", args.mix, "--seed", str(args.seed),
        "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-itl-ms", str(args.slo_itl_ms),
        "--out", str(out),
    ]  # fmt: skip
    if version:
        argv += ["--versions", version]
    if args.label:
        argv += ["--label", args.label]
    if args.openai_strict:
        argv.append("--openai-strict")
    if args.processes:
        argv += ["--processes", str(args.processes)]
    point = run.parser().parse_args(argv)
    point.command_line = shlex.join(["weir", "bench", "run", *argv])
    return point


def sweep(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from bench import run, sweep_report

    versions = [v for v in args.versions.split(",") if v] or [""]
    given = [float(r) for r in args.rates.split(",") if r] if args.rates else None
    if given is None and not args.auto:
        raise SystemExit("give --rates 1,2,4,... or --auto")
    searches = {
        v: Search(given, args.start_rate, 2.0, args.max_rate, args.refine) for v in versions
    }
    slo = report.SLO(args.slo_ttft_ms, args.slo_itl_ms)
    points: list[Point] = []
    out: Path = args.out
    step = 0
    columns = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("sweep", total=None)

        def measure(version: str, rate: float) -> None:
            for repeat in range(args.repeats):
                name = version or args.label or "gateway"
                path = out / name / f"rate-{rate:g}" / f"repeat-{repeat + 1}"
                progress.update(
                    task, description=f"{name} at {rate:g}/s, repeat {repeat + 1}/{args.repeats}"
                )
                results = run.execute(point_args(args, version, rate, path), console, quiet=True)
                point = point_from(results, name, rate, repeat + 1, path, slo)
                points.append(point)
                console.print(
                    f"{name:>10} {rate:>7g}/s  met {point.attainment:6.1%}  goodput "
                    f"{point.goodput_rps:7.2f}/s  TTFT p99 {ms(point.ttft_ms, 'p99'):>8} ms"
                    f"  ITL p99 {ms(point.itl_ms, 'p99'):>7} ms"
                )

        if args.warmup > 0:
            first = min(given) if given else args.start_rate
            for version in versions:
                name = version or args.label or "gateway"
                progress.update(task, description=f"{name}: warm-up, {args.warmup:g} s")
                warm = point_args(args, version, first, out / "warmup" / name)
                warm.duration = args.warmup
                run.execute(warm, console, quiet=True)
        while True:
            order = versions if step % 2 == 0 else versions[::-1]
            todo = [(v, searches[v].next_rate()) for v in order]
            todo = [(v, r) for v, r in todo if r is not None]
            if not todo:
                break
            for version, rate in todo:
                assert rate is not None
                measure(version, rate)
            for version, rate in todo:
                assert rate is not None
                name = version or args.label or "gateway"
                searches[version].record(rate, holds(at(points, name, rate), args.attainment))
            step += 1
        names = {v: v or args.label or "gateway" for v in versions}
        chosen = {names[v]: searches[v].chosen() for v in versions}
        # the verdict needs both versions at the weaker one's first failed rate
        if len(versions) > 1:
            for version in versions:
                for other in versions:
                    rate = decisive_rate(points, names[other], chosen[names[other]])
                    if rate is not None and not at(points, names[version], rate):
                        measure(version, rate)
    summary = {
        "slo": {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms},
        "attainment": args.attainment,
        "rule": "highest rate holding the SLO below the first that does not; "
        + (
            "given rates"
            if given
            else f"auto: x2 from {args.start_rate:g}, {args.refine} bisections"
        ),
        "host": args.host,
        "command": shlex.join(["weir", "bench", "sweep", *sys.argv[1:]]),
        "duration_s": args.duration,
        "repeats": args.repeats,
        "warmup_s": args.warmup,
        "chosen": chosen,
        "verdict": verdict(points, chosen, args.attainment, args.repeats),
        "points": [asdict(p) | {"attainment": p.attainment} for p in points],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    sweep_report.write(summary, out)
    return summary


def table(summary: dict[str, Any]) -> Table:
    table = Table(title="sweep: the curve per version")
    head = ["version", "rate (req/s)", "repeat", "met SLO (%)", "goodput (req/s)"]
    head += ["TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)", "ITL p99 (ms)", "errors"]
    for column in head:
        table.add_column(column, justify="right")
    for p in sorted(summary["points"], key=lambda p: (p["version"], p["rate"], p["repeat"])):
        table.add_row(
            p["version"], f"{p['rate']:g}", str(p["repeat"]), f"{p['attainment']:.1%}",
            f"{p['goodput_rps']:.2f}", ms(p["ttft_ms"], "p50"), ms(p["ttft_ms"], "p99"),
            ms(p["itl_ms"], "p50"), ms(p["itl_ms"], "p99"), str(sum(p["errors"].values())),
        )  # fmt: skip
    return table


def main() -> None:
    args = parser().parse_args()
    console = Console(width=max(140, Console().width))
    summary = sweep(args, console)
    console.print(table(summary))
    for version, rate in summary["chosen"].items():
        console.print(f"[bold]{version}[/]: chosen rate {'none' if rate is None else rate}")
    console.print(f"verdict: {summary['verdict']}")
    console.print(f"sweep: {args.out / 'sweep.json'}  report: {args.out / 'sweep.html'}")


if __name__ == "__main__":
    main()
