"""The sweep's page: the curve per version side by side, the chosen rates, the verdict."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from bench import report
from bench.sweep import ms


def plots(summary: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = sorted({p["version"] for p in summary["points"]})
    slo = summary["slo"]
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    panels = [
        (axes[0][0], "ttft_ms", "TTFT (ms)", slo["ttft_ms"]),
        (axes[0][1], "itl_ms", "inter-token gap (ms)", slo["itl_ms"]),
    ]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, version in enumerate(versions):
        mine = sorted(
            (p for p in summary["points"] if p["version"] == version), key=lambda p: p["rate"]
        )
        colour = colours[n % len(colours)]
        rates = [p["rate"] for p in mine]
        for axis, key, _, _ in panels:
            for q, style in (("p50", "-"), ("p99", "--")):
                values = [p[key].get(q, math.nan) for p in mine]
                axis.plot(rates, values, style, marker="o", color=colour, label=f"{version} {q}")
        axes[1][0].plot(
            rates, [p["goodput_rps"] for p in mine], "-o", color=colour, label=f"{version} goodput"
        )
        axes[1][0].plot(
            rates, [p["achieved_rps"] for p in mine], ":", color=colour, label=f"{version} sent"
        )
        axes[1][1].plot(rates, [100 * p["attainment"] for p in mine], "-o", color=colour,
                        label=version)  # fmt: skip
        chosen = summary["chosen"].get(version)
        if chosen is not None:
            for axis in axes.flat:
                axis.axvline(chosen, color=colour, alpha=0.35, linewidth=3)
    for axis, _, title, limit in panels:
        axis.axhline(limit, color="red", linestyle=":", label="SLO")
        axis.set_title(f"{title} against the arrival rate")
        axis.set_ylabel("ms")
    axes[1][0].set_title("goodput (requests/s within the SLO) and the rate sent")
    axes[1][0].set_ylabel("requests/s")
    axes[1][1].axhline(100 * summary["attainment"], color="red", linestyle=":", label="target")
    axes[1][1].set_title("requests within the SLO")
    axes[1][1].set_ylabel("%")
    axes[1][1].set_ylim(0, 102)
    for axis in axes.flat:
        axis.set_xlabel("arrival rate (requests/s, Poisson)")
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    out = [("The curve: latency, goodput and SLO attainment per arrival rate", report._png(figure))]
    plt.close(figure)
    return out


def html(summary: dict[str, Any], images: list[tuple[str, str]], out: Path) -> str:
    chosen = "".join(
        f"<dt>{escape(v)}</dt><dd>{'no rate held' if r is None else f'{r:g} requests/s'}</dd>"
        for v, r in summary["chosen"].items()
    )
    about = [
        ("host", summary["host"]),
        (
            "SLO",
            f"TTFT \u2264 {summary['slo']['ttft_ms']:g} ms and mean inter-token gap \u2264 "
            f"{summary['slo']['itl_ms']:g} ms, for at least {summary['attainment']:.0%} "
            "of requests",
        ),
        ("rule", summary["rule"]),
        ("points", f"{summary['duration_s']:g} s each, {summary['repeats']} repeat(s) per rate"),
        ("command", summary["command"]),
    ]
    about_html = "<dl>" + "".join(
        f"<dt>{escape(k)}</dt><dd><code>{escape(str(v))}</code></dd>" for k, v in about
    ) + "</dl>"  # fmt: skip
    head = [
        "version", "rate (req/s)", "repeat", "sent (req/s)", "met SLO (%)", "goodput (req/s)",
        "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)", "ITL p99 (ms)", "E2E p99 (ms)",
        "errors", "run",
    ]  # fmt: skip
    rows = []
    for p in sorted(summary["points"], key=lambda p: (p["version"], p["rate"], p["repeat"])):
        link = Path(p["path"])
        rel = link.relative_to(out) if link.is_relative_to(out) else link
        rows.append(
            [
                p["version"], f"{p['rate']:g}", p["repeat"], f"{p['achieved_rps']:.2f}",
                f"{100 * p['attainment']:.1f}", f"{p['goodput_rps']:.2f}",
                ms(p["ttft_ms"], "p50"), ms(p["ttft_ms"], "p99"), ms(p["itl_ms"], "p50"),
                ms(p["itl_ms"], "p99"), ms(p["e2e_ms"], "p99"), sum(p["errors"].values()),
                f"{rel}/report.html",
            ]
        )  # fmt: skip
    body = (
        f"{about_html}<h2>Chosen rate per version</h2><dl id='chosen'>{chosen}</dl>"
        f"<p id='verdict'><b>Verdict:</b> {escape(summary['verdict'])}</p>"
        f"{report.figures(images)}<h2>Points</h2>{report._table(head, rows, 'points')}"
    )
    return report.page("SLO sweep", body)


def write(summary: dict[str, Any], out: Path) -> Path:
    path = out / "sweep.html"
    path.write_text(html(summary, plots(summary), out))
    return path
