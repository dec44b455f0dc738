"""The gateway's own cost, against a fast mock upstream, gateway and direct in one run.

Starts ``bench.mock_engine`` and one ``weir serve`` in front of it (API key auth on),
then measures, interleaving direct and gateway:

1. added latency of a non-streaming chat request at concurrency 1 (p50, p99);
2. for streams from a paced mock (a chunk every ``--interval-ms``): added TTFT, and the
   inter-token gaps on both paths (no coalescing: the gateway's gaps match the mock's);
3. with ``wrk`` (Debian's package), requests/s and p99 at rising connection counts, and
   the highest rate the gateway holds with p99 added latency under 10 ms.

When a ``litellm`` command is found (``--litellm``, else on PATH), LiteLLM's proxy is
started in front of the same mock with the same key and measured in the same run as a
peer column (1 and 3).

When ``nginx`` is found (``--nginx``, else on PATH; Debian's ``nginx-light``), a plain
nginx reverse proxy (keep-alive upstream, no buffering) on the gateway's core is the
floor: what one more hop on this layout costs with no work done in it (1, 2 and 3). The
gateway's figures minus nginx's are the gateway's own work.

Black-box: it runs the ``weir`` command and speaks HTTP; it imports nothing of Weir's.

    python -m bench.overhead [--requests 2000] [--wrk-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.procs import (
    free_port,
    gateway_config,
    split_cores,
    start,
    start_gateway,
    stop_all,
    wait_for,
)
from bench.sse import SSETimer

KEY = "sk-bench-overhead"
BODY = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 16,
}
LITELLM_CONFIG = """
model_list:
  - model_name: smollm2
    litellm_params:
      model: openai/smollm2
      api_base: http://127.0.0.1:{mock_port}/v1
      api_key: unused
general_settings:
  master_key: {key}
"""
NGINX_MAIN = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
"""  # one nginx worker, in the foreground, its files in the run's work directory
NGINX_CONFIG = (
    NGINX_MAIN
    + """\
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream mock {{ server 127.0.0.1:{mock}; keepalive 256; }}
    upstream paced {{ server 127.0.0.1:{paced}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen 127.0.0.1:{paced_port};
        location / {{
            proxy_pass http://paced;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
)
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def added_latency(targets: dict[str, str], requests: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {t: [] for t in targets}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=10, headers=headers) as client:
        for _ in range(100):
            for base in targets.values():
                client.post(f"{base}/v1/chat/completions", json=BODY).raise_for_status()
        for n in track(range(requests), description="non-streaming, c=1"):
            for target in list(targets) if n % 2 == 0 else list(reversed(targets)):
                started = time.perf_counter_ns()
                client.post(f"{targets[target]}/v1/chat/completions", json=BODY).raise_for_status()
                samples[target].append((time.perf_counter_ns() - started) / 1e6)
    return samples


def stream_timing(targets: dict[str, str], requests: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {t: {"ttft": [], "gaps": []} for t in targets}
    body = BODY | {"stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=10, headers=headers) as client:
        for n in track(range(requests), description="streaming, c=1"):
            for target in list(targets) if n % 2 == 0 else list(reversed(targets)):
                timer = SSETimer()
                with client.stream(
                    "POST", f"{targets[target]}/v1/chat/completions", json=body
                ) as response:
                    for piece in response.iter_raw():
                        timer.feed(piece)
                timing = timer.finish()
                if not timing.ok or timing.ttft_ms is None:
                    raise SystemExit(f"{target}: stream did not end cleanly")
                out[target]["ttft"].append(timing.ttft_ms)
                out[target]["gaps"].extend(timing.gaps_ms)
    return out


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict[str, float]:
    threads = str(min(connections, 2))
    cmd = [
        "wrk",
        "-t",
        threads,
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    values = {}
    for q in ("50", "99"):
        found = re.search(rf"\s{q}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", text)
        if found is None:
            raise SystemExit(f"cannot read p{q} from wrk:\n{text}")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[found.group(2)]
        values[f"p{q}"] = float(found.group(1)) * scale
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rps, **values, "non2xx": float(non2xx.group(1)) if non2xx else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream-requests", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--litellm", default=shutil.which("litellm") or "", help="litellm binary")
    parser.add_argument(
        "--nginx",
        default=shutil.which("nginx")
        or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else ""),
        help="nginx binary, the bare-hop floor ('' to leave it out)",
    )
    parser.add_argument("--out", default="bench-results/overhead.json")
    parser.add_argument(
        "--proxy-cpus",
        default="auto",
        help="cores for the gateway (and LiteLLM): 'auto' = the last core when there are 2+,"
        " the mocks, wrk and this client on the others; 'none' = no pinning; or '3,4'",
    )
    parser.add_argument(
        "--before",
        default="",
        help="a checkout of an earlier commit (git worktree): its gateway runs beside this"
        " one, same config and core, measured interleaved as the target 'before'",
    )
    args = parser.parse_args()
    proxy_cpus, rest = split_cores(args.proxy_cpus)
    if rest:
        os.sched_setaffinity(0, rest)  # this client, and the mocks and wrk it starts
    console = Console(width=120)
    work = Path(tempfile.mkdtemp(prefix="weir-overhead-"))
    mock, paced, gate, paced_gate = free_port(), free_port(), free_port(), free_port()
    mock_cmd = [sys.executable, "-m", "bench.mock_engine"]
    procs = [
        start([*mock_cmd, "--port", str(mock)], work / "mock.log"),
        start(
            [*mock_cmd, "--port", str(paced), "--interval-ms", str(args.interval_ms)],
            work / "paced.log",
        ),
    ]
    for port, upstream in ((gate, mock), (paced_gate, paced)):
        procs.append(
            start_gateway(
                gateway_config(port, upstream, work, key=KEY), work, f"gw-{port}", cpus=proxy_cpus
            )
        )
    before, before_paced = free_port(), free_port()
    if args.before:
        # the earlier commit's code first on the path; the same interpreter and packages
        old = [sys.executable, "-P", "-m", "serving.cli"]  # -P: not this checkout first
        env = {"PYTHONPATH": str(Path(args.before).resolve())}
        for port, upstream in ((before, mock), (before_paced, paced)):
            toml = gateway_config(port, upstream, work, key=KEY)
            procs.append(
                start_gateway(toml, work, f"before-{port}", env, cpus=proxy_cpus, weir=old)
            )
    litellm_port = free_port()
    if args.litellm:
        config = work / "litellm.yaml"
        config.write_text(LITELLM_CONFIG.format(mock_port=mock, key=KEY))
        procs.append(
            start(
                [
                    args.litellm,
                    "--config",
                    str(config),
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                ],
                work / "litellm.log",
                cpus=proxy_cpus,
            )
        )
    nginx_port, nginx_paced = free_port(), free_port()
    if args.nginx:
        config = work / "nginx.conf"
        config.write_text(
            NGINX_CONFIG.format(
                work=work, mock=mock, paced=paced, port=nginx_port, paced_port=nginx_paced
            )
        )
        procs.append(
            start(
                [args.nginx, "-c", str(config), "-e", str(work / "nginx-error.log")],
                work / "nginx.log",
                cpus=proxy_cpus,
            )
        )
    results: dict[str, Any] = {
        "cores": {"proxies": sorted(proxy_cpus), "client_mock_wrk": sorted(rest)},
    }
    try:
        for port in (mock, paced):
            wait_for(f"http://127.0.0.1:{port}/health")
        for port in (gate, paced_gate):
            wait_for(f"http://127.0.0.1:{port}/readyz")
        direct = {"direct": f"http://127.0.0.1:{mock}", "gateway": f"http://127.0.0.1:{gate}"}
        if args.litellm:
            wait_for(f"http://127.0.0.1:{litellm_port}/health/liveliness", timeout_s=180)
            direct["litellm"] = f"http://127.0.0.1:{litellm_port}"
        paced_targets = {
            "direct": f"http://127.0.0.1:{paced}",
            "gateway": f"http://127.0.0.1:{paced_gate}",
        }
        if args.before:
            for port in (before, before_paced):
                wait_for(f"http://127.0.0.1:{port}/readyz")
            direct["before"] = f"http://127.0.0.1:{before}"
            paced_targets["before"] = f"http://127.0.0.1:{before_paced}"
        if args.nginx:
            for port in (nginx_port, nginx_paced):
                wait_for(f"http://127.0.0.1:{port}/health")
            direct["nginx"] = f"http://127.0.0.1:{nginx_port}"
            paced_targets["nginx"] = f"http://127.0.0.1:{nginx_paced}"
        latency = added_latency(direct, args.requests)
        results["c1"] = {t: {"p50": pct(s, 50), "p99": pct(s, 99)} for t, s in latency.items()}
        streams = stream_timing(paced_targets, args.stream_requests)
        results["stream"] = {
            t: {
                "ttft_p50": pct(v["ttft"], 50), "ttft_p99": pct(v["ttft"], 99),
                "gap_p50": pct(v["gaps"], 50), "gap_p99": pct(v["gaps"], 99),
                "gap_p1": pct(v["gaps"], 1), "coalesced": sum(g < 1.0 for g in v["gaps"]),
                "gaps": len(v["gaps"]),
            }
            for t, v in streams.items()
        }  # fmt: skip
        if shutil.which("wrk"):
            script = work / "post.lua"
            script.write_text(WRK_SCRIPT.format(body=json.dumps(BODY), key=KEY))
            sweep = []
            for connections in track(args.connections, description="wrk sweep"):
                row = {"connections": connections}
                for target, base in direct.items():
                    row[target] = wrk(
                        f"{base}/v1/chat/completions", connections, args.wrk_seconds, script
                    )
                sweep.append(row)
            results["wrk"] = sweep
    finally:
        stop_all(procs)
    report(console, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"written to {out}")


def report(console: Console, results: dict[str, Any]) -> None:
    cores = results.get("cores", {})
    if cores.get("proxies"):
        console.print(
            f"cores: gateway/LiteLLM on {cores['proxies']}, client, mocks and wrk on"
            f" {cores['client_mock_wrk']}"
        )
    c1 = results["c1"]
    proxies = [t for t in c1 if t != "direct"]
    table = Table(title="Non-streaming chat, concurrency 1 (ms)")
    for column in ("path", "p50", "p99", "p50 added", "p99 added"):
        table.add_column(column, justify="right")
    for target, value in c1.items():
        added = ["", ""]
        if target != "direct":
            added = [f"{value[q] - c1['direct'][q]:+.3f}" for q in ("p50", "p99")]
        table.add_row(target, f"{value['p50']:.3f}", f"{value['p99']:.3f}", *added)
    console.print(table)

    st = results["stream"]
    table = Table(title="Streams from a paced mock, concurrency 1 (ms)")
    columns = ("ttft_p50", "ttft_p99", "gap_p1", "gap_p50", "gap_p99")
    for column in ("path", "TTFT p50", "TTFT p99", "gap p1", "gap p50", "gap p99", "gaps < 1 ms"):
        table.add_column(column, justify="right")
    for target, v in st.items():
        table.add_row(target, *(f"{v[c]:.3f}" for c in columns), f"{v['coalesced']}/{v['gaps']}")
    for target in (t for t in st if t != "direct"):
        added = [f"{st[target][c] - st['direct'][c]:+.3f}" for c in columns]
        table.add_row(f"{target} added", *added, "")
    console.print(table)

    if "wrk" not in results:
        return
    table = Table(title="wrk, closed loop: requests/s and p99 ms (p99 added over direct)")
    table.add_column("connections", justify="right")
    for target in ["direct", *proxies]:
        table.add_column(f"{target} req/s", justify="right")
        table.add_column(f"{target} p99", justify="right")
    best: dict[str, float] = {}
    for row in results["wrk"]:
        direct = row["direct"]
        cells = [str(row["connections"]), f"{direct['rps']:.0f}", f"{direct['p99']:.2f}"]
        for target in proxies:
            m = row[target]
            added_p99 = m["p99"] - direct["p99"]
            if added_p99 < 10 and m["non2xx"] == 0:
                best[target] = max(best.get(target, 0.0), m["rps"])
            cells += [f"{m['rps']:.0f}", f"{m['p99']:.2f} ({added_p99:+.1f})"]
        table.add_row(*cells)
    console.print(table)
    results["max_rps_p99_added_under_10ms"] = best
    for target in proxies:
        rate = best.get(target, 0.0)
        console.print(f"highest {target} rate with p99 added under 10 ms: {rate:.0f} requests/s")
    targets(console, results, best)


def targets(console: Console, results: dict[str, Any], best: dict[str, float]) -> None:
    """Issue 10's targets for the gateway, met or missed (and by how much)."""
    c1, st = results["c1"], results["stream"]
    peer = best.get("litellm")
    rows = [
        ("added p50, c=1 (ms)", c1["gateway"]["p50"] - c1["direct"]["p50"], 0.5, "<="),
        ("added p99, c=1 (ms)", c1["gateway"]["p99"] - c1["direct"]["p99"], 1.5, "<="),
        ("added TTFT p50 (ms)", st["gateway"]["ttft_p50"] - st["direct"]["ttft_p50"], 0.5, "<="),
        ("gap p99 vs direct (ms)", st["gateway"]["gap_p99"] - st["direct"]["gap_p99"], 1.0, "<="),
        (
            "req/s, p99 added < 10 ms" + (" (10x LiteLLM)" if peer else ""),
            best.get("gateway", 0.0),
            10 * peer if peer else 3000.0,
            ">=",
        ),
    ]
    table = Table(title="Targets (issue 26; the gap: issue 10)")
    for column in ("what", "measured", "target", "verdict"):
        table.add_column(column, justify="right")
    verdicts = {}
    for name, value, goal, sense in rows:
        met = value <= goal if sense == "<=" else value >= goal
        verdicts[name] = {"measured": value, "target": goal, "met": met}
        table.add_row(name, f"{value:.2f}", f"{sense} {goal:g}", "met" if met else "MISSED")
    console.print(table)
    results["targets"] = verdicts
    if "nginx" in c1 and "nginx" in st:
        floor(console, results)
    if "before" in c1 and "before" in st:
        compare(console, results, best)


def added_side_by_side(
    results: dict[str, Any], other: str, rows: dict[str, tuple[str, str]]
) -> dict[str, tuple[float, float]]:
    """Per row, what ``other`` and the gateway add over direct: (other's, the gateway's)."""
    found = {}
    for name, (section, q) in rows.items():
        data = results[section]
        found[name] = (data[other][q] - data["direct"][q], data["gateway"][q] - data["direct"][q])
    return found


ADDED_ROWS = {
    "added p50, c=1 (ms)": ("c1", "p50"),
    "added p99, c=1 (ms)": ("c1", "p99"),
    "added TTFT p50 (ms)": ("stream", "ttft_p50"),
    "added TTFT p99 (ms)": ("stream", "ttft_p99"),
}


def compare(console: Console, results: dict[str, Any], best: dict[str, float]) -> None:
    """The earlier commit (``--before``) against this one, measured in the same run."""
    rows = ADDED_ROWS | {"gap p99 (ms)": ("stream", "gap_p99")}
    table = Table(title="Before (--before) and after (this checkout), interleaved in one run")
    for column in ("what", "before", "after", "after - before"):
        table.add_column(column, justify="right")
    changes: dict[str, dict[str, float]] = {}
    for name, (was, now) in added_side_by_side(results, "before", rows).items():
        changes[name] = {"before": was, "after": now, "change": now - was}
        table.add_row(name, f"{was:+.3f}", f"{now:+.3f}", f"{now - was:+.3f}")
    if "before" in best or "gateway" in best:
        was, now = best.get("before", 0.0), best.get("gateway", 0.0)
        name = "req/s, p99 added < 10 ms"
        changes[name] = {"before": was, "after": now, "change": now - was}
        table.add_row(name, f"{was:.0f}", f"{now:.0f}", f"{now - was:+.0f}")
    console.print(table)
    results["before_after"] = changes


def floor(console: Console, results: dict[str, Any]) -> None:
    """What one bare hop costs on this layout (nginx), and the gateway's work above it."""
    table = Table(title="The hop and the gateway's own work (nginx: a hop doing nothing)")
    for column in ("what", "nginx adds", "gateway adds", "gateway over nginx"):
        table.add_column(column, justify="right")
    above = {}
    for name, (hop, ours) in added_side_by_side(results, "nginx", ADDED_ROWS).items():
        above[name] = {"nginx": hop, "gateway": ours, "gateway_over_nginx": ours - hop}
        table.add_row(name, f"{hop:+.3f}", f"{ours:+.3f}", f"{ours - hop:+.3f}")
    console.print(table)
    results["over_nginx"] = above


if __name__ == "__main__":
    main()
