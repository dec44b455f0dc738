"""Run a Locust scenario headless with progress, then write results.json and report.html.

    python -m bench.run --scenario stream-chat --users 8 --duration 60 \\
        --host http://127.0.0.1:8000 [--versions v1,v2] [--compare-host URL] [--shape step]

Scenarios name the user classes of ``bench/locustfile.py``; ``open-loop`` sends at a
fixed Poisson arrival ``--rate`` instead of a user count. Black-box: the gateway is
reached over HTTP only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bench import report, shapes

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCENARIOS = {
    "stream-chat": ["StreamingChatUser"],
    "chat": ["ChatUser"],
    "completion": ["CompletionUser"],
    "embed": ["EmbeddingUser"],
    "rag": ["RagUser"],
    "mixed": ["StreamingChatUser", "ChatUser", "CompletionUser", "EmbeddingUser"],
    "open-loop": ["ArrivalUser"],
}


def locust_command(args: argparse.Namespace, samples: Path, out: Path) -> list[str]:
    users = 1 if args.scenario == "open-loop" else args.users
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    cmd += ["-u", str(users), "-r", str(max(1, users)), "-t", f"{int(args.duration)}s"]
    cmd += [
        "--host",
        args.host,
        "--only-summary",
        "--csv",
        str(out / "locust"),
        "--stop-timeout",
        "30",
    ]
    cmd += ["--weir-samples", str(samples), "--weir-mix", args.mix, "--weir-seed", str(args.seed)]
    cmd += ["--weir-model", args.model, "--weir-rate", str(args.rate)]
    if args.versions:
        cmd += ["--weir-versions", args.versions]
    if args.compare_host:
        cmd += [
            "--weir-compare-host",
            args.compare_host,
            "--weir-compare-model",
            args.compare_model or args.model,
        ]
    return cmd + SCENARIOS[args.scenario]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="stream-chat")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60, help="seconds")
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--versions", default="", help="pin requests to these versions, in turn")
    parser.add_argument(
        "--compare-host", default="", help="also send to this base URL (label: direct)"
    )
    parser.add_argument("--compare-model", default="")
    parser.add_argument("--shape", choices=sorted(shapes.SHAPES), default="constant")
    parser.add_argument("--mix", default="fixed", help="payloads: fixed, uniform, sharegpt, cache")
    parser.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slo-ttft-ms", type=float, default=report.SLO.ttft_ms)
    parser.add_argument("--slo-itl-ms", type=float, default=report.SLO.itl_ms)
    parser.add_argument("--slo-e2e-ms", type=float, default=report.SLO.e2e_ms)
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    )
    args = parser.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples.jsonl"
    samples.unlink(missing_ok=True)
    env = dict(os.environ)
    if args.shape != "constant" and args.scenario != "open-loop":
        table = shapes.stages(args.shape, args.users, args.duration)
        env["WEIR_BENCH_STAGES"] = json.dumps([stage.__dict__ for stage in table])
    console = Console(width=max(160, Console().width))
    command = locust_command(args, samples, out)
    console.print(f"[bold]{args.scenario}[/] against {args.host}: {' '.join(command[3:])}")
    log = (out / "locust.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]} requests"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(args.scenario, total=args.duration, done=0)
        while proc.poll() is None:
            time.sleep(0.5)
            done = sum(1 for _ in samples.open()) if samples.exists() else 0
            progress.update(
                task, completed=min(args.duration, time.monotonic() - started), done=done
            )
        progress.update(task, completed=args.duration)
    log.close()
    if proc.returncode not in (0, 1):  # Locust exits 1 when any request failed
        raise SystemExit(f"locust failed ({proc.returncode}); see {out / 'locust.log'}")
    slo = report.SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms)
    results = report.build(
        samples, out, slo, title=f"{args.scenario}, {args.users} users, {args.duration:.0f} s"
    )
    results["command"] = {k: str(v) for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from bench.compare import table_for

    console.print(table_for(results))
    console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
