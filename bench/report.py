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
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
BOOTSTRAP = 200


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 1000.0  # streaming: first token within this
    itl_ms: float = 200.0  # streaming: mean inter-token gap within this
    e2e_ms: float = 10000.0  # non-streaming: whole answer within this

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


def _stats(values_ms: list[float], rng: np.random.Generator) -> dict[str, Any]:
    if not values_ms:
        return {"count": 0}
    data = np.asarray(values_ms)
    out: dict[str, Any] = {"count": len(values_ms), "mean": float(data.mean())}
    out |= {f"p{q}": float(np.percentile(data, q)) for q in PERCENTILES}
    for q in (50, 99):
        resampled = rng.choice(data, size=(BOOTSTRAP, len(data)), replace=True)
        spread = np.percentile(np.percentile(resampled, q, axis=1), [2.5, 97.5])
        out[f"p{q}_ci"] = [float(spread[0]), float(spread[1])]
    return out


def summarise(samples: list[dict[str, Any]], slo: SLO, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    if not samples:
        raise SystemExit("no samples: did the run send any request?")
    start = min(s["start_wall_ns"] for s in samples)
    end = max(s["start_wall_ns"] + s["e2e_ns"] for s in samples)
    window_s = max((end - start) / 1e9, 1e-9)
    variants: dict[str, Any] = {}
    for label, mine in grouped(samples).items():
        ok = [s for s in mine if not s.get("error") and s.get("status") == 200]
        errors = Counter(str(s.get("error") or s.get("status")) for s in mine if s not in ok)
        output_tokens = sum(int(s.get("completion_tokens") or 0) for s in ok)
        variants[label] = {
            "requests": len(mine),
            "ok": len(ok),
            "error_rate": 1 - len(ok) / len(mine),
            "errors": dict(errors),
            "request_throughput_rps": len(ok) / window_s,
            "output_tokens_per_s": output_tokens / window_s,
            "goodput_rps": sum(slo.met(s) for s in mine) / window_s,
            "ttft_ms": _stats(
                [s["ttft_ns"] / 1e6 for s in ok if s.get("ttft_ns") is not None], rng
            ),
            "inter_token_ms": _stats([g / 1e6 for s in ok for g in s.get("gaps_ns") or []], rng),
            "e2e_ms": _stats([s["e2e_ns"] / 1e6 for s in ok], rng),
        }
    return {"window_s": window_s, "slo": slo.__dict__, "variants": variants}


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


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
        axis.grid(alpha=0.3)
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
        axis.set_title(f"{title} percentiles (ms)")
        axis.legend()
    out.append(("Percentiles side by side", _png(figure)))
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(15, 4))
    start = min(s["start_wall_ns"] for s in samples)
    for label in labels:
        mine = sorted(groups[label], key=lambda s: s["start_wall_ns"])
        seconds = np.array([(s["start_wall_ns"] + s["e2e_ns"] - start) / 1e9 for s in mine])
        if len(seconds) == 0:
            continue
        buckets = np.arange(0, seconds.max() + 5, 5)
        counts, _ = np.histogram(seconds, bins=buckets)
        axes[0].plot(buckets[:-1], counts / 5, label=label)
        axes[1].plot(seconds, [s["e2e_ns"] / 1e6 for s in mine], ".", markersize=3, label=label)
    axes[0].set_title("completed requests per second (5 s buckets)")
    axes[1].set_title("end-to-end latency over time (ms)")
    for axis in axes:
        axis.set_xlabel("seconds into the run")
        axis.grid(alpha=0.3)
        axis.legend()
    out.append(("Throughput and latency over time", _png(figure)))
    plt.close(figure)
    return out


def html(results: dict[str, Any], images: list[tuple[str, str]], title: str) -> str:
    rows = []
    for label, v in sorted(results["variants"].items()):
        cells = [
            label, v["requests"], f"{v['error_rate']:.2%}", f"{v['request_throughput_rps']:.2f}",
            f"{v['output_tokens_per_s']:.1f}", f"{v['goodput_rps']:.2f}",
        ]  # fmt: skip
        for metric in ("ttft_ms", "inter_token_ms", "e2e_ms"):
            cells += [f"{v[metric].get(f'p{q}', float('nan')):.1f}" for q in (50, 99)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["variant", "requests", "errors", "req/s", "out tok/s", "goodput req/s"]
    head += [f"{m} p{q}" for m in ("TTFT", "ITL", "e2e") for q in (50, 99)]
    figures = "".join(
        f"<h2>{caption}</h2><img src='data:image/png;base64,{data}'>" for caption, data in images
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    )
    errors = json.dumps({k: v["errors"] for k, v in results["variants"].items()}, indent=2)
    header = "".join(f"<th>{h}</th>" for h in head)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body><h1>{title}</h1>"
        f"<p>window {results['window_s']:.1f} s; SLO {results['slo']}</p>"
        f"<table><tr>{header}</tr>{''.join(rows)}</table>{figures}"
        f"<h2>Errors</h2><pre>{errors}</pre></body></html>"
    )


def build(samples_path: Path, out: Path, slo: SLO, title: str = "Weir benchmark") -> dict[str, Any]:
    samples = load(samples_path)
    results = summarise(samples, slo)
    out.mkdir(parents=True, exist_ok=True)
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
