"""``weir serve``: start the engines and the gateway (or N gateway workers on remote engines)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from models.engines.engine_host import is_local
from models.engines.launcher import check_weights
from models.errors import StoreError
from serving import memory
from serving.cli.config import load
from serving.http import connection_guard
from serving.http.connection_guard import GuardedHttpTools
from serving.settings import Settings, load_settings

EXAMPLE_BODY = (
    '{"model": "smollm2", "messages": [{"role": "system", "content": "You are a helpful'
    ' assistant."}, {"role": "user", "content": "What is the capital of France?"}]}'
)
CONFIG_ENV = "WEIR_CONFIG_FILE"
APP_FACTORY = "serving.cli.serve:app_from_environment"  # what each uvicorn worker imports


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.http.app import create_app
    from serving.log_config import configure

    settings = load(args)
    configure(args.log_level, settings.observability.log_format)
    gateway = settings.gateway.model_copy(
        update={
            k: v
            for k, v in (
                ("host", args.host),
                ("port", args.port),
                ("allow_unauthenticated", args.allow_unauthenticated or None),
            )
            if v is not None
        }
    )
    settings = settings.model_copy(update={"gateway": gateway})
    if not gateway.api_keys and not settings.keys.enabled:
        if not gateway.loopback and not gateway.allow_unauthenticated:
            print(
                f"weir: refusing to bind {gateway.host} with no API keys configured: anyone who"
                " can reach it could use it. Configure gateway.api_keys, bind 127.0.0.1, or pass"
                " --allow-unauthenticated.",
                file=sys.stderr,
            )
            return 2
        if gateway.loopback:
            print(f"weir: no API keys configured: serving on {gateway.host} (loopback) only.")
        else:
            print(f"weir: WARNING: no API keys and bound to {gateway.host}: open to the network.")
    if args.workers > 1:
        return _serve_workers(args, settings)
    try:
        weights = check_weights(settings.models, settings.store)
    except StoreError as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 1

    base = f"http://{gateway.host}:{gateway.port}"

    def banner() -> None:
        print(
            f"\nWeir is ready: {base}/v1 (OpenAI base URL)\n"
            f"  curl {base}/v1/chat/completions -H 'content-type: application/json' \\\n"
            f"    -d '{EXAMPLE_BODY}'\n",
            flush=True,
        )

    app = create_app(settings, weights=weights, on_ready=banner)
    connection_guard.configure(gateway)
    memory.start_trimmer(gateway.memory_trim_interval_s)
    config = uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        loop="uvloop",
        http=GuardedHttpTools,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    print(f"weir: starting engines; gateway listening on {base} (ready when /readyz is 200)")
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        print("weir: stopped", file=sys.stderr)
        return 130
    return 0


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """``--workers N``: N gateway processes on one port (uvicorn's workers), sharing
    Redis for keys, limits and the cache, and one metrics directory. Ctrl-C exits 130,
    as without workers."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    class Workers(Multiprocess):
        interrupted = False  # uvicorn's supervisor returns alike on SIGINT and SIGTERM

        def handle_int(self) -> None:
            self.interrupted = True
            super().handle_int()

    local = [f"{m.name}@{v.version}" for m in settings.models for v in m.versions if is_local(v)]
    supervisor = None
    made: list[str] = []  # temporary directories made here, removed on the way out
    if local and settings.engines.board is None:  # the engines in one process of their own
        made.append(tempfile.mkdtemp(prefix="weir-fleet-"))
        board = Path(made[-1]) / "fleet.json"
        os.environ["WEIR_ENGINES__BOARD"] = str(board)
        supervisor = _start_supervisor(args, board)
        print(f"weir: engines {', '.join(local)} in supervisor pid {supervisor.pid} ({board})")
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.makedirs(metrics_dir)
    else:
        metrics_dir = tempfile.mkdtemp(prefix="weir-metrics-")
        made.append(metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if args.config is not None:
        os.environ[CONFIG_ENV] = str(args.config.resolve())
    os.environ["WEIR_LOG_LEVEL"] = args.log_level
    gateway = settings.gateway
    host = args.host or gateway.host
    port = args.port if args.port is not None else gateway.port
    print(f"weir: {args.workers} gateway workers on http://{host}:{port} (metrics: {metrics_dir})")
    config = uvicorn.Config(
        APP_FACTORY,
        factory=True,
        workers=args.workers,
        host=host,
        port=port,
        loop="uvloop",
        http=GuardedHttpTools,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    try:  # what uvicorn.run does with workers, keeping the supervisor to ask about Ctrl-C
        workers = Workers(config, sockets=[config.bind_socket()])
        workers.run()
    finally:
        if supervisor is not None:
            _stop_supervisor(supervisor, settings.engines.stop_grace_s + 10)
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)
    if workers.interrupted:
        print("weir: stopped", file=sys.stderr)
        return 130
    return 0


def _start_supervisor(args: argparse.Namespace, board: Path) -> subprocess.Popen[bytes]:
    """``weir engines`` as our child; it stops its engines when our pipe to it closes."""
    command = [sys.executable, "-m", "serving.cli"]
    if args.config is not None:
        command += ["--config", str(args.config.resolve())]
    command += ["engines", "--board", str(board), "--log-level", args.log_level, "--watch-stdin"]
    return subprocess.Popen(command, stdin=subprocess.PIPE)


def _stop_supervisor(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def app_from_environment() -> Any:
    """The app for one worker process: config from ``WEIR_CONFIG_FILE``, env overrides."""
    import os

    from serving.http.app import create_app
    from serving.log_config import configure

    config = os.environ.get(CONFIG_ENV)
    settings = load_settings(Path(config) if config else None)
    connection_guard.configure(settings.gateway)
    memory.start_trimmer(settings.gateway.memory_trim_interval_s)
    configure(os.environ.get("WEIR_LOG_LEVEL", "INFO"), settings.observability.log_format)
    return create_app(settings)


def add_commands(commands: Any) -> None:
    serve_cmd = commands.add_parser("serve", help="start the engines and the gateway")
    serve_cmd.add_argument("--host", default=None)
    serve_cmd.add_argument("--port", type=int, default=None)
    serve_cmd.add_argument("--allow-unauthenticated", action="store_true")
    serve_cmd.add_argument("--log-level", default="INFO")
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes; local engines then run in one supervisor (weir engines)",
    )
    serve_cmd.set_defaults(func=serve)
