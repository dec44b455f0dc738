"""Run a Locust scenario headless with progress, then write results.json and report.html.

    python -m bench.run --scenario stream-chat --users 8 --duration 60 \\
        --host http://127.0.0.1:8000 [--versions v1,v2] [--compare-host URL] [--shape step]

Scenarios name the user classes of ``bench/locustfile.py``; ``open-loop`` sends at a
fixed Poisson arrival ``--rate`` instead of a user count. Black-box: the gateway is
reached over HTTP only, and any OpenAI-compatible server can be the host or the compare
host (``--label``, ``--api-key``, ``--openai-strict``).

Past one core, Locust's own master/worker mode: ``--processes N`` runs a master and N
local workers; ``--master --expect-workers K`` waits for K workers (``--processes N`` of
them local), which other machines start with ``--worker --master-host H``. Workers send
their raw samples to the master (``bench.distributed``), which writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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
STOP_TIMEOUT_S = 30
WORKERS_WAIT_S = 120  # how long a master waits for --expect-workers before giving up
LOCUST = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]


def distributed(args: argparse.Namespace) -> bool:
    return bool(args.master or (args.processes or 1) > 1)


def local_workers(args: argparse.Namespace) -> int:
    """Workers this command starts: ``--processes`` (a master alone starts none unless
    asked; a plain run of one process is Locust's local runner, no workers)."""
    if args.master:
        return int(args.processes or 0)
    return int(args.processes or 1) if distributed(args) else 0


def expected_workers(args: argparse.Namespace) -> int:
    return int(args.expect_workers or local_workers(args))


def users_of(args: argparse.Namespace) -> int:
    """Open loop: one arrival user per worker (the rate is split over them)."""
    if args.scenario == "open-loop":
        return expected_workers(args) if distributed(args) else 1
    return int(args.users)


def locust_command(
    args: argparse.Namespace, samples: Path, out: Path, master_port: int = 0
) -> list[str]:
    users = users_of(args)
    cmd = [*LOCUST, "--headless", "-u", str(users), "-r", str(max(1, users))]
    if distributed(args):
        cmd += ["--master", "--expect-workers", str(expected_workers(args))]
        cmd += ["--expect-workers-max-wait", str(WORKERS_WAIT_S)]
        cmd += ["--master-bind-port", str(master_port or args.master_port)]
        cmd += ["--weir-run-time", str(args.duration)]
    else:
        cmd += ["-t", f"{int(args.duration)}s"]
    cmd += [
        "--host",
        args.host,
        "--only-summary",
        "--csv",
        str(out / "locust"),
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
    ]
    cmd += ["--weir-samples", str(samples), "--weir-mix", args.mix, "--weir-seed", str(args.seed)]
    cmd += ["--weir-model", args.model, "--weir-rate", str(args.rate)]
    cmd += ["--weir-arrival-users", str(users)]
    if args.label:
        cmd += ["--weir-label", args.label]
    if args.openai_strict:
        cmd.append("--weir-openai-strict")
    if args.versions:
        cmd += ["--weir-versions", args.versions]
    if args.compare_host:
        cmd += [
            "--weir-compare-host",
            args.compare_host,
            "--weir-compare-model",
            args.compare_model or args.model,
            "--weir-compare-label",
            args.compare_label,
        ]
    return cmd + SCENARIOS[args.scenario]


def worker_command(master_host: str, master_port: int) -> list[str]:
    """A worker learns everything else (host, users, options) from the master."""
    return [*LOCUST, "--worker", "--master-host", master_host, "--master-port", str(master_port)]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="stream-chat")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60, help="seconds")
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--label", default="", help="the host's variant name (gateway)")
    parser.add_argument("--versions", default="", help="pin requests to these versions, in turn")
    parser.add_argument(
        "--compare-host", default="", help="also send to this base URL (label: direct)"
    )
    parser.add_argument("--compare-model", default="")
    parser.add_argument("--compare-label", default="direct")
    parser.add_argument(
        "--openai-strict",
        action="store_true",
        help="send only OpenAI's fields (no vLLM ignore_eos): for servers that refuse others",
    )
    parser.add_argument("--shape", choices=sorted(shapes.SHAPES), default="constant")
    parser.add_argument("--mix", default="fixed", help="payloads: fixed, uniform, sharegpt, cache")
    parser.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slo-ttft-ms", type=float, default=report.SLO.ttft_ms)
    parser.add_argument("--slo-itl-ms", type=float, default=report.SLO.itl_ms)
    parser.add_argument("--slo-e2e-ms", type=float, default=report.SLO.e2e_ms)
    group = parser.add_argument_group("distributed (Locust master/worker)")
    group.add_argument(
        "--processes",
        type=int,
        default=None,
        help="local load processes (default 1; >1: a master and N workers)",
    )
    group.add_argument("--master", action="store_true", help="be the master of a distributed run")
    group.add_argument(
        "--expect-workers", type=int, default=0, help="master: workers to wait for, all hosts"
    )
    group.add_argument("--master-port", type=int, default=5557, help="master: port to bind")
    group.add_argument("--worker", action="store_true", help="run --processes workers only")
    group.add_argument("--master-host", default="127.0.0.1", help="worker: the master's address")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    )
    return parser


def check_endpoint(base_url: str, model: str, api_key: str) -> str | None:
    """None when ``base_url`` answers ``/v1/models`` and lists ``model`` (its part before
    any ``@version``), else why not. A server without ``/v1/models`` passes (not every
    OpenAI-compatible server has it)."""
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/models",
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            listed = [str(m.get("id")) for m in json.load(response).get("data") or []]
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return f"{base_url}: {exc.code} from /v1/models (set --api-key or WEIR_BENCH_API_KEY)"
        return None
    except (OSError, ValueError) as exc:
        return f"{base_url}: not reachable ({exc})"
    name = model.split("@", 1)[0]
    if listed and name not in listed:
        return f"{base_url}: no model {name!r}; it serves {', '.join(sorted(listed))}"
    return None


def preflight(args: argparse.Namespace) -> None:
    key = os.environ.get("WEIR_BENCH_API_KEY", "")
    problems = [check_endpoint(args.host, args.model, key)]
    if args.compare_host:
        compare_key = os.environ.get("WEIR_BENCH_COMPARE_API_KEY", "")
        problems.append(
            check_endpoint(args.compare_host, args.compare_model or args.model, compare_key)
        )
    found = [p for p in problems if p]
    if found:
        raise SystemExit("; ".join(found))


def start_workers(
    count: int, master_host: str, master_port: int, out: Path
) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != "WEIR_BENCH_STAGES"}  # master's shape
    procs = []
    for n in range(count):
        with (out / f"worker-{n}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    worker_command(master_host, master_port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    return procs


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def run_workers(args: argparse.Namespace, console: Console) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    procs = start_workers(args.processes or 1, args.master_host, args.master_port, out)
    console.print(
        f"{len(procs)} worker(s) for the master at {args.master_host}:{args.master_port}; "
        f"logs in {out}; results are written by the master"
    )
    codes = [proc.wait() for proc in procs]
    if any(code not in (0, 1) for code in codes):
        raise SystemExit(f"a worker failed ({codes}); see {out}")


def execute(args: argparse.Namespace, console: Console, quiet: bool = False) -> dict[str, Any]:
    """One run: Locust (and its local workers), then results.json and report.html."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    preflight(args)
    samples = out / "samples.jsonl"
    samples.unlink(missing_ok=True)
    env = dict(os.environ)
    if args.shape != "constant" and args.scenario != "open-loop":
        table = shapes.stages(args.shape, args.users, args.duration)
        env["WEIR_BENCH_STAGES"] = json.dumps([stage.__dict__ for stage in table])
    port = args.master_port if args.master else _free_port()
    command = locust_command(args, samples, out, port)
    if not quiet:
        console.print(f"[bold]{args.scenario}[/] against {args.host}: {' '.join(command[3:])}")
    log = (out / "locust.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    workers = start_workers(local_workers(args), "127.0.0.1", port, out)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]} requests"),
        TimeRemainingColumn(),
    ]
    try:
        with Progress(*columns, console=console, disable=quiet) as progress:
            task = progress.add_task(args.scenario, total=args.duration, done=0)
            while proc.poll() is None:
                time.sleep(0.5)
                done = sum(1 for _ in samples.open()) if samples.exists() else 0
                progress.update(
                    task, completed=min(args.duration, time.monotonic() - started), done=done
                )
            progress.update(task, completed=args.duration)
    finally:
        log.close()
        for worker in workers:
            try:
                worker.wait(30)  # the master's quit ends them
            except subprocess.TimeoutExpired:
                worker.terminate()
                worker.wait(10)
    if proc.returncode not in (0, 1):  # Locust exits 1 when any request failed
        raise SystemExit(f"locust failed ({proc.returncode}); see {out / 'locust.log'}")
    slo = report.SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms)
    context = {
        "host": args.host,
        "compare_host": args.compare_host or None,
        "versions": [v for v in args.versions.split(",") if v],
        "scenario": args.scenario,
        "load_processes": expected_workers(args) if distributed(args) else 1,
        "command": getattr(args, "command_line", "")
        or shlex.join(["weir", "bench", "run", *sys.argv[1:]]),
        "options": {k: str(v) for k, v in vars(args).items()},
    }
    workers_file = out / "workers.json"
    if workers_file.exists():
        context["workers"] = json.loads(workers_file.read_text())
    users = f"{args.rate:g}/s Poisson" if args.scenario == "open-loop" else f"{args.users} users"
    title = f"{args.scenario}, {users}, {args.duration:g} s"
    return report.build(samples, out, slo, title=title, context=context)


def main() -> None:
    args = parser().parse_args()
    console = Console(width=max(160, Console().width))
    if args.worker:
        run_workers(args, console)
        return
    results = execute(args, console)
    from bench.compare import table_for

    console.print(table_for(results))
    out: Path = args.out
    console.print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
