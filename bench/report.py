"""From raw samples to ``results.json`` and an HTML report with plots, per variant.

Per variant (a model version, or the gateway and the engine behind it): request and
output-token throughput; TTFT, inter-token gap and end-to-end p50/p90/p95/p99, each
p50 and p99 with a bootstrap 95% interval (the noise band ``compare`` uses); errors by
type; and goodput, the requests per second that met the SLO.

    python -m bench.report samples.jsonl --out results/ [--slo-ttft-ms 1000 --slo-itl-ms 200]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 1000.0  # streaming: first token within this
    itl_ms: float = 200.0  # streaming: mean inter-token gap within this
    e2e_ms: float = 10000.0  # non-streaming: whole answer within this

    def describe(self) -> str:
        return (
            f"streams: TTFT \u2264 {self.ttft_ms:g} ms and mean inter-token gap \u2264 "
            f"{self.itl_ms:g} ms; other requests: end to end \u2264 {self.e2e_ms:g} ms"
        )

    def met(self, sample: dict[str, Any]) -> bool:
        if sample.get("error") or sample.get("status") != 200:
            return False
        if sample["kind"] == "chat-stream":
            ttft = sample.get("ttft_ns")
            gaps = sample.get("gaps_ns") or []
            mean_gap = statistics.fmean(gaps) / 1e6 if gaps else 0.0
            return ttft is not None and ttft / 1e6 <= self.ttft_ms and mean_gap <= self.itl_ms
        return bool(sample["e2e_ns"] / 1e6 <= self.e2e_ms)


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grouped(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Samples by variant, and by request kind too when a run mixed several kinds."""
    mixed = len({s["kind"] for s in samples}) > 1
    groups: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        label = f"{sample['variant']}/{sample['kind']}" if mixed else str(sample["variant"])
        groups.setdefault(label, []).append(sample)
    return dict(sorted(groups.items()))


def _quantile_band(ordered: np.ndarray, q: float) -> list[float]:
    """A 95 % confidence band for the ``q`` quantile (0 < q < 1) from the order statistics
    around it (the binomial, normal approximation): distribution-free, and linear in the
    samples where a bootstrap of 200 resamples held 200 copies of them."""
    n = len(ordered)
    half = 1.96 * math.sqrt(n * q * (1 - q))
    low = min(n - 1, max(0, math.floor(n * q - half)))
    high = min(n - 1, max(0, math.ceil(n * q + half)))
    return [float(ordered[low]), float(ordered[high])]


def _stats(values_ms: list[float]) -> dict[str, Any]:
    if not values_ms:
        return {"count": 0}
    data = np.sort(np.asarray(values_ms))
    out: dict[str, Any] = {"count": len(values_ms), "mean": float(data.mean())}
    out |= {f"p{q}": float(np.percentile(data, q)) for q in PERCENTILES}
    for q in (50, 99):
        out[f"p{q}_ci"] = _quantile_band(data, q / 100)
    return out


def summarise(samples: list[dict[str, Any]], slo: SLO) -> dict[str, Any]:
    if not samples:
        raise SystemExit("no samples: did the run send any request?")
    start = min(s["start_wall_ns"] for s in samples)
    end = max(s["start_wall_ns"] + s["e2e_ns"] for s in samples)
    window_s = max((end - start) / 1e9, 1e-9)
    variants: dict[str, Any] = {}
    for label, mine in grouped(samples).items():
        ok = [s for s in mine if not s.get("error") and s.get("status") == 200]
        failed = (s for s in mine if s.get("error") or s.get("status") != 200)
        errors = Counter(str(s.get("error") or s.get("status")) for s in failed)
        output_tokens = sum(int(s.get("completion_tokens") or 0) for s in ok)
        variants[label] = {
            "requests": len(mine),
            "ok": len(ok),
            "error_rate": 1 - len(ok) / len(mine),
            "errors": dict(errors),
            "request_throughput_rps": len(ok) / window_s,
            "output_tokens_per_s": output_tokens / window_s,
            "goodput_rps": sum(slo.met(s) for s in mine) / window_s,
            "ttft_ms": _stats([s["ttft_ns"] / 1e6 for s in ok if s.get("ttft_ns") is not None]),
            "inter_token_ms": _stats([g / 1e6 for s in ok for g in s.get("gaps_ns") or []]),
            "e2e_ms": _stats([s["e2e_ns"] / 1e6 for s in ok]),
        }
    return {"window_s": window_s, "slo": slo.__dict__, "variants": variants}


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def bucket_width(window_s: float) -> float:
    """Time-series buckets: about 30 points over the run, at least 1 s, whole seconds."""
    return float(max(1, round(window_s / 30)))


def rate_series(
    ends_s: list[float], window_s: float, bucket_s: float
) -> tuple[list[float], list[float]]:
    """Completions per second in buckets of ``bucket_s`` over ``[0, window_s]``, each
    divided by its own width: the last bucket is the run's remainder, not a full bucket
    (a partial last bucket divided by the full width makes throughput seem to collapse at
    the end of every run). A remainder under half a bucket joins the bucket before it.
    Returns (bucket midpoints, rates)."""
    edges = [0.0]
    while edges[-1] + bucket_s < window_s:
        edges.append(edges[-1] + bucket_s)
    if len(edges) > 1 and window_s - edges[-1] < bucket_s / 2:
        edges.pop()
    edges.append(max(window_s, edges[-1] + 1e-9))
    counts, _ = np.histogram(np.asarray(ends_s, dtype=float), bins=np.asarray(edges))
    widths = np.diff(edges)
    mids = [float(a + w / 2) for a, w in zip(edges, widths, strict=False)]
    return mids, [float(c / w) for c, w in zip(counts, widths, strict=True)]


def _zero_based(axis: Any) -> None:
    """Latency and throughput axes start at 0: an axis starting near the data turns a few
    percent into a cliff."""
    axis.set_ylim(bottom=0)


def plots(samples: list[dict[str, Any]], results: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(samples)
    labels = list(groups)
    out: list[tuple[str, str]] = []
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, (key, title) in zip(
        axes, (("ttft", "TTFT"), ("gaps", "inter-token gap"), ("e2e", "end to end")), strict=True
    ):
        for label in labels:
            ok = [s for s in groups[label] if not s.get("error")]
            if key == "ttft":
                values = [s["ttft_ns"] / 1e6 for s in ok if s.get("ttft_ns") is not None]
            elif key == "gaps":
                values = [g / 1e6 for s in ok for g in s.get("gaps_ns") or []]
            else:
                values = [s["e2e_ns"] / 1e6 for s in ok]
            if values:
                ordered = np.sort(values)
                axis.plot(ordered, np.linspace(0, 1, len(ordered)), label=label)
        axis.set_title(f"{title}: CDF")
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests")
        axis.set_xlim(left=0)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    out.append(("Latency distributions (CDF), per variant", _png(figure)))
    plt.close(figure)

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / max(1, len(labels))
    for axis, (metric, title) in zip(
        axes,
        (("ttft_ms", "TTFT"), ("inter_token_ms", "inter-token gap"), ("e2e_ms", "end to end")),
        strict=True,
    ):
        for n, label in enumerate(labels):
            stats = results["variants"][label][metric]
            values = [stats.get(f"p{q}", 0.0) for q in PERCENTILES]
            axis.bar(np.arange(len(PERCENTILES)) + n * width, values, width, label=label)
        axis.set_xticks(
            np.arange(len(PERCENTILES)) + width * (len(labels) - 1) / 2,
            [f"p{q}" for q in PERCENTILES],
        )
        axis.set_title(f"{title} percentiles")
        axis.set_ylabel("ms")
        _zero_based(axis)
        axis.legend()
    out.append(("Percentiles side by side", _png(figure)))
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(15, 4))
    start = min(s["start_wall_ns"] for s in samples)
    window_s = float(results["window_s"])
    bucket = bucket_width(window_s)
    for label in labels:
        mine = sorted(groups[label], key=lambda s: s["start_wall_ns"])
        ends = [(s["start_wall_ns"] + s["e2e_ns"] - start) / 1e9 for s in mine]
        if not ends:
            continue
        mids, rates = rate_series(ends, window_s, bucket)
        axes[0].plot(mids, rates, marker=".", label=label)
        axes[1].plot(ends, [s["e2e_ns"] / 1e6 for s in mine], ".", markersize=3, label=label)
    axes[0].set_title(f"completed requests per second ({bucket:g} s buckets)")
    axes[0].set_ylabel("requests/s")
    axes[1].set_title("end-to-end latency over time")
    axes[1].set_ylabel("ms")
    for axis in axes:
        axis.set_xlabel("seconds into the run (at completion)")
        axis.set_xlim(0, window_s)
        _zero_based(axis)
        axis.grid(alpha=0.3)
        axis.legend()
    out.append(("Throughput and latency over time", _png(figure)))
    plt.close(figure)
    return out


STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
    "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}"
    "dt{font-weight:bold}dd{margin:0}code{font-size:90%}"
)


def _cell(value: Any) -> str:
    return f"<td>{escape(str(value))}</td>"


def _table(head: list[str], rows: list[list[Any]], table_id: str = "") -> str:
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    ident = f" id='{table_id}'" if table_id else ""
    return f"<table{ident}><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _ci(stats: dict[str, Any], q: int) -> str:
    value, band = stats.get(f"p{q}"), stats.get(f"p{q}_ci")
    if value is None:
        return "n/a"
    return f"{value:.1f} [{band[0]:.1f}, {band[1]:.1f}]" if band else f"{value:.1f}"


def page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def figures(images: list[tuple[str, str]]) -> str:
    return "".join(
        f"<figure><h2>{escape(caption)}</h2>"
        f"<img class='plot' alt='{escape(caption)}' src='data:image/png;base64,{data}'></figure>"
        for caption, data in images
    )


def html(results: dict[str, Any], images: list[tuple[str, str]], title: str) -> str:
    context = results.get("context") or {}
    about = [
        ("host", context.get("host") or "n/a"),
        ("compare host", context.get("compare_host") or "none"),
        ("versions", ", ".join(context.get("versions") or []) or "not pinned"),
        ("load processes", context.get("load_processes", 1)),
        ("window", f"{results['window_s']:.1f} s (first request sent to last one ended)"),
        ("SLO", SLO(**results["slo"]).describe()),
        ("command", context.get("command") or "n/a"),
    ]
    about_html = "<dl>" + "".join(
        f"<dt>{escape(k)}</dt><dd><code>{escape(str(v))}</code></dd>" for k, v in about
    ) + "</dl>"  # fmt: skip
    head = [
        "variant", "requests", "errors (%)", "throughput (req/s)", "output (tok/s)",
        "goodput (req/s)", "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)", "ITL p99 (ms)",
        "E2E p50 (ms)", "E2E p99 (ms)",
    ]  # fmt: skip
    rows = []
    intervals = []
    for label, v in sorted(results["variants"].items()):
        row: list[Any] = [
            label, v["requests"], f"{v['error_rate']:.2%}", f"{v['request_throughput_rps']:.2f}",
            f"{v['output_tokens_per_s']:.1f}", f"{v['goodput_rps']:.2f}",
        ]  # fmt: skip
        for metric in ("ttft_ms", "inter_token_ms", "e2e_ms"):
            row += [f"{v[metric].get(f'p{q}', float('nan')):.1f}" for q in (50, 99)]
        rows.append(row)
        metrics = ("ttft_ms", "inter_token_ms", "e2e_ms")
        intervals.append([label] + [_ci(v[m], q) for m in metrics for q in (50, 99)])
    ci_head = ["variant"] + [
        f"{name} p{q} (ms) [95% CI]" for name in ("TTFT", "ITL", "E2E") for q in (50, 99)
    ]
    errors = [
        [label, error, count]
        for label, v in sorted(results["variants"].items())
        for error, count in sorted(v["errors"].items())
    ]
    counting = results.get("counting") or {}
    count_note = (
        f"<p id='counting'>Requests counted here: {counting.get('samples', 'n/a')}, one per "
        f"request that ended (answered, failed or cut at the stop), from the raw samples. "
        f"{escape(counting.get('locust_note', ''))}</p>"
    )
    workers = context.get("workers") or {}
    worker_rows = [
        [name, w.get("samples"), w.get("clock_offset_ns"), "yes" if w.get("final_batch") else "NO"]
        for name, w in sorted(workers.items())
    ]
    body = (
        f"{about_html}"
        f"<h2>Per variant</h2>{_table(head, rows, 'variants')}{count_note}"
        f"<h2>Confidence intervals (bootstrap, 95%)</h2>{_table(ci_head, intervals, 'intervals')}"
        f"{figures(images)}"
        f"<h2>Errors</h2>"
        + (_table(["variant", "error", "count"], errors, "errors") if errors else "<p>none</p>")
        + (
            "<h2>Load workers</h2>"
            + _table(["worker", "samples", "clock offset (ns)", "final batch"], worker_rows)
            if worker_rows
            else ""
        )
    )
    return page(title, body)


def locust_count(out: Path) -> int | None:
    """Requests in Locust's own ``locust_stats.csv`` (request rows, not TTFT/ITL)."""
    path = out / "locust_stats.csv"
    if not path.exists():
        return None
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return sum(
        int(r["Request Count"])
        for r in rows
        if r.get("Type") not in ("TTFT", "ITL", "") and r.get("Name") != "Aggregated"
        and not str(r.get("Name", "")).startswith("arrival dropped")
    )  # fmt: skip


LOCUST_NOTE = (
    "Locust's CSV counts {locust}. The count above is the right one: Locust rewrites its CSV "
    "once a second and does not write it again after the run's stop, so requests that end "
    "in the last second or while the stop timeout lets in-flight requests finish are missing "
    "from it (and in a distributed run, whatever the workers had not yet reported)."
)


def build(
    samples_path: Path,
    out: Path,
    slo: SLO,
    title: str = "Weir benchmark",
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    samples = load(samples_path)
    results = summarise(samples, slo)
    out.mkdir(parents=True, exist_ok=True)
    results["context"] = context or {}
    results["counting"] = {"samples": len(samples)}
    counted = locust_count(out)
    if counted is not None:
        results["counting"]["locust_csv"] = counted
        if counted != len(samples):
            results["counting"]["locust_note"] = LOCUST_NOTE.format(locust=counted)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.html").write_text(html(results, plots(samples, results), title))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("samples", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results/run"))
    parser.add_argument("--slo-ttft-ms", type=float, default=SLO.ttft_ms)
    parser.add_argument("--slo-itl-ms", type=float, default=SLO.itl_ms)
    parser.add_argument("--slo-e2e-ms", type=float, default=SLO.e2e_ms)
    args = parser.parse_args()
    build(args.samples, args.out, SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'report.html'}")


if __name__ == "__main__":
    main()
