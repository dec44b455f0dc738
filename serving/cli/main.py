"""The ``weir`` command: ``weir serve``, ``weir models pull|list|verify``, ``weir bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models import catalog
from models.engines.launcher import check_weights
from models.errors import StoreError
from models.store import ModelStore
from serving.settings import Settings, load_settings

EXAMPLE_BODY = (
    '{"model": "smollm2", "messages": [{"role": "system", "content": "You are a helpful'
    ' assistant."}, {"role": "user", "content": "What is the capital of France?"}]}'
)


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    try:
        return load_settings(args.config)
    except FileNotFoundError as exc:
        raise SystemExit(f"weir: {exc}") from None
    except ValidationError as exc:
        raise SystemExit(f"weir: invalid configuration: {exc}") from None


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.http.app import create_app
    from serving.log_config import configure

    settings = _settings(args)
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
    config = uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        loop="uvloop",
        http="httptools",
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


CONFIG_ENV = "WEIR_CONFIG_FILE"


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """``--workers N``: N gateway processes on one port (uvicorn's workers), sharing
    Redis for keys, limits and the cache, and one metrics directory."""
    import os
    import shutil
    import tempfile

    import uvicorn

    local = [f"{m.name}@{v.version}" for m in settings.models for v in m.versions if not v.remote]
    if local:
        print(
            f"weir: --workers needs remote engines (url or urls) for every version; these"
            f" would be started once per worker: {', '.join(local)}. Run `weir serve` for the"
            " engines, or vLLM itself, and point the gateways at them.",
            file=sys.stderr,
        )
        return 2
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.makedirs(metrics_dir)
    else:
        metrics_dir = tempfile.mkdtemp(prefix="weir-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if args.config is not None:
        os.environ[CONFIG_ENV] = str(args.config.resolve())
    os.environ["WEIR_LOG_LEVEL"] = args.log_level
    gateway = settings.gateway
    host = args.host or gateway.host
    port = args.port if args.port is not None else gateway.port
    print(f"weir: {args.workers} gateway workers on http://{host}:{port} (metrics: {metrics_dir})")
    uvicorn.run(
        "serving.cli.main:app_from_environment",
        factory=True,
        workers=args.workers,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def app_from_environment() -> Any:
    """The app for one worker process: config from ``WEIR_CONFIG_FILE``, env overrides."""
    import os

    from serving.http.app import create_app
    from serving.log_config import configure

    config = os.environ.get(CONFIG_ENV)
    settings = load_settings(Path(config) if config else None)
    configure(os.environ.get("WEIR_LOG_LEVEL", "INFO"), settings.observability.log_format)
    return create_app(settings)


def _store(args: argparse.Namespace) -> ModelStore:
    settings = _settings(args)
    return ModelStore(args.store or settings.store.root)


def models_pull(args: argparse.Namespace) -> int:
    store = _store(args)
    names = args.names or sorted(catalog.RECIPES)
    try:
        for name in names:
            store.pull(name, force=args.force, report=lambda msg: print(f"weir: {msg}", flush=True))
    except StoreError as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 1
    return 0


def models_add(args: argparse.Namespace) -> int:
    """``weir models add NAME --version V --path DIR``: register weights, not serve them."""
    store = _store(args)
    entry = f"{args.name}-{args.version}"
    try:
        manifest = store.add(entry, args.path.expanduser(),
                             report=lambda msg: print(f"weir: {msg}", flush=True))  # fmt: skip
    except StoreError as exc:
        print(f"weir: refused: {exc}", file=sys.stderr)
        return 1
    print(
        f"weir: {entry} is in the store ({len(manifest.files)} files, sha256 verified)."
        f" To serve it, add to {args.name}'s versions in weir.toml:\n\n"
        f'[[models.versions]]\nversion = "{args.version}"\nweights = "{entry}"\n'
    )
    return 0


def models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    store = _store(args)
    table = Table(title=f"Model store: {store.root}")
    for column in ("name", "source", "files", "size"):
        table.add_column(column)
    for manifest in store.entries():
        source = f"{manifest.source.get('package')}=={manifest.source.get('version')}"
        table.add_row(
            manifest.name, source, str(len(manifest.files)), f"{manifest.total_bytes / 1e6:.0f} MB"
        )
    Console().print(table)
    return 0


def models_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    names = args.names or [m.name for m in store.entries()]
    failed = 0
    for name in names:
        try:
            manifest = store.verify(name)
            print(f"ok      {name} ({len(manifest.files)} files, sha256 match)")
        except StoreError as exc:
            failed += 1
            print(f"FAILED  {exc}")
    return 1 if failed else 0


def keys(args: argparse.Namespace) -> int:
    """``weir keys create|list|revoke``, on the configured store (Redis or the file)."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from serving.http.routes.admin import KeyCreate, create_key
    from serving.keys.store import KeyStoreUnavailable, UnknownKey, make_key_store

    config = _settings(args).keys
    store = make_key_store(config.file, config.redis_url, config.timeout_s)

    async def run() -> int:
        try:
            if args.keys_command == "create":
                spec = KeyCreate(
                    name=args.name,
                    models=[m for m in (args.models or "").split(",") if m],
                    rpm=args.rpm,
                    tpm=args.tpm,
                    tokens_per_day=args.tokens_per_day,
                    max_concurrency=args.max_concurrency,
                    cache=not args.no_cache,
                    cache_namespace=args.cache_namespace,
                )
                secret, record = await create_key(store, spec)
                print(f"created key {record.id} ({record.name}); its secret, shown only now:")
                print(secret)
            elif args.keys_command == "list":
                table = Table(title=f"API keys in {store!r}")
                for column in (
                    "id",
                    "name",
                    "models",
                    "rpm",
                    "tpm",
                    "tokens/day",
                    "concurrency",
                    "revoked",
                ):
                    table.add_column(column)
                for r in await store.list():
                    table.add_row(
                        r.id, r.name, ",".join(r.models) or "*", str(r.rpm or "-"),
                        str(r.tpm or "-"), str(r.tokens_per_day or "-"),
                        str(r.max_concurrency or "-"), "yes" if r.revoked else "",
                    )  # fmt: skip
                Console(width=max(140, Console().width)).print(table)
            else:
                record = await store.revoke(args.key_id)
                print(f"revoked key {record.id} ({record.name})")
        except KeyStoreUnavailable as exc:
            print(f"weir: {exc}", file=sys.stderr)
            return 1
        except UnknownKey as exc:
            print(f"weir: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.aclose()
        return 0

    return asyncio.run(run())


def limits(args: argparse.Namespace) -> int:
    """``weir limits show|set``: per-model token budgets, in Redis for every gateway, or
    through the running gateway's admin API when limits are in-process."""
    import asyncio
    import json

    settings = _settings(args)
    url = settings.limits.store_url(settings.keys)
    tpm = None if args.limits_command == "show" or args.clear else args.tpm
    if args.limits_command == "set" and (tpm is None or tpm < 0) and not args.clear:
        print("weir: give --tpm N (N >= 0) or --clear", file=sys.stderr)
        return 2
    if url is None:
        return _limits_over_http(settings, args.limits_command, args.model, tpm)

    from serving.http.routes.admin_limits import limits_view
    from serving.limits.limiter import Limiter
    from serving.limits.redis_store import RedisLimitStore
    from serving.limits.store import LimitStoreUnavailable

    async def run() -> int:
        limiter = Limiter(RedisLimitStore(url, timeout_s=settings.limits.timeout_s))
        try:
            if args.limits_command == "set":
                await limiter.store.set_model_tpm(args.model, tpm)
                print(
                    f"{args.model}: tokens per minute {tpm if tpm is not None else 'as configured'}"
                )
            else:
                print(
                    json.dumps(
                        await limits_view(limiter, dict(settings.limits.model_tpm)), indent=2
                    )
                )
        except LimitStoreUnavailable as exc:
            print(f"weir: {exc}", file=sys.stderr)
            return 1
        finally:
            await limiter.aclose()
        return 0

    return asyncio.run(run())


def _limits_over_http(settings: Settings, command: str, model: str | None, tpm: int | None) -> int:
    import json

    from serving.cli.admin_client import AdminCallFailed, AdminClient

    client = AdminClient.from_settings(settings)
    if client.key is None:
        print("weir: limits are in-process and keys.admin_key is unset: no way in", file=sys.stderr)
        return 1
    try:
        if command == "show":
            answer = client.call("GET", "/weir/admin/limits")
        else:
            answer = client.call("PUT", f"/weir/admin/limits/models/{model}", {"tpm": tpm})
    except AdminCallFailed as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def file_sd(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus ``file_sd`` entries for the engines in a ``/weir/engines`` answer."""
    from urllib.parse import urlsplit

    entries = []
    for engine in engines:
        url = engine.get("base_url")
        if not url:
            continue
        parts = urlsplit(url)
        labels = {"model": engine["model"], "model_version": engine["version"],
                  "replica": engine["replica"]}  # fmt: skip
        entries.append({"targets": [parts.netloc], "labels": labels})
    return entries


def scrape_targets(args: argparse.Namespace) -> int:
    """``weir scrape-targets``: the engines' ``/metrics`` as a Prometheus file_sd list."""
    import json

    from serving.cli.admin_client import AdminCallFailed, AdminClient

    settings = _settings(args)
    client = AdminClient.from_settings(settings, args.url, key_env="WEIR_API_KEY")
    try:
        engines = client.call("GET", "/weir/engines")["data"]
    except (AdminCallFailed, KeyError, TypeError) as exc:
        print(f"weir: could not read {client.base}/weir/engines: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(file_sd(engines), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def ingest_command(args: argparse.Namespace) -> int:
    """``weir ingest PATH --collection C``: files into a collection over the gateway's API."""
    import os

    import httpx

    from serving.cli.ingest import ingest

    settings = _settings(args)
    base = args.url or f"http://{settings.gateway.host}:{settings.gateway.port}"
    key = os.environ.get("WEIR_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if not args.path.exists():
        print(f"weir: {args.path} does not exist", file=sys.stderr)
        return 2
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            count = ingest(client, args.collection, args.path, batch=args.batch)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        print(f"weir: ingest failed: {exc}", file=sys.stderr)
        return 1
    print(f"weir: {count} documents in {args.collection}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """``weir bench run|compare ...``: the black-box benchmark suite in ``bench/``."""
    import subprocess

    module = {"run": "bench.run", "compare": "bench.compare"}[args.bench_command]
    return subprocess.call([sys.executable, "-m", module, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="weir.toml (default: built-in)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="start the engines and the gateway")
    serve_cmd.add_argument("--host", default=None)
    serve_cmd.add_argument("--port", type=int, default=None)
    serve_cmd.add_argument("--allow-unauthenticated", action="store_true")
    serve_cmd.add_argument("--log-level", default="INFO")
    serve_cmd.add_argument(
        "--workers", type=int, default=1, help="gateway processes (remote engines only)"
    )
    serve_cmd.set_defaults(func=serve)

    models_cmd = commands.add_parser("models", help="the local model store")
    models_cmd.add_argument("--store", type=Path, default=None, help="store directory")
    model_commands = models_cmd.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="fetch and prepare models")
    pull.add_argument("names", nargs="*", help=f"default: all of {sorted(catalog.RECIPES)}")
    pull.add_argument("--force", action="store_true", help="pull again even if present")
    pull.set_defaults(func=models_pull)
    model_commands.add_parser("list", help="what is in the store").set_defaults(func=models_list)
    add_cmd = model_commands.add_parser("add", help="register local weights (checked, copied)")
    add_cmd.add_argument("name")
    add_cmd.add_argument("--version", required=True)
    add_cmd.add_argument("--path", type=Path, required=True, help="an HF model directory")
    add_cmd.set_defaults(func=models_add)
    verify = model_commands.add_parser("verify", help="check sizes and sha256 of weight files")
    verify.add_argument("names", nargs="*")
    verify.set_defaults(func=models_verify)
    keys_cmd = commands.add_parser("keys", help="API keys: create, list, revoke")
    key_commands = keys_cmd.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key; prints its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--models", default="", help="comma-separated; default: every model")
    for flag in ("--rpm", "--tpm", "--tokens-per-day", "--max-concurrency"):
        create.add_argument(flag, type=int, default=None)
    create.add_argument("--no-cache", action="store_true", help="never use the response cache")
    create.add_argument(
        "--cache-namespace", default=None, help="keys with the same namespace share cached answers"
    )
    key_commands.add_parser("list", help="keys and their limits, never secrets")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys_cmd.set_defaults(func=keys)

    limits_cmd = commands.add_parser("limits", help="per-model token budgets at runtime")
    limit_commands = limits_cmd.add_subparsers(dest="limits_command", required=True)
    limit_commands.add_parser("show", help="budgets and outstanding reservations")
    set_cmd = limit_commands.add_parser("set", help="change a model's tokens per minute now")
    set_cmd.add_argument("model")
    set_cmd.add_argument("--tpm", type=int, default=None, help="tokens per minute (0 stops it)")
    set_cmd.add_argument("--clear", action="store_true", help="back to the configured budget")
    limits_cmd.set_defaults(func=limits, model=None, clear=False, tpm=None)

    targets = commands.add_parser(
        "scrape-targets", help="the engines' /metrics as Prometheus file_sd JSON"
    )
    targets.add_argument("--url", default=None, help="gateway base URL (default: the config's)")
    targets.add_argument("--out", default=None, help="write here instead of stdout")
    targets.set_defaults(func=scrape_targets)

    ingest_cmd = commands.add_parser(
        "ingest", help="add .txt/.md/.jsonl files to a collection (WEIR_API_KEY as the key)"
    )
    ingest_cmd.add_argument("path", type=Path)
    ingest_cmd.add_argument("--collection", required=True)
    ingest_cmd.add_argument("--url", default=None, help="gateway base URL (default: the config's)")
    ingest_cmd.add_argument("--batch", type=int, default=32, help="documents per request")
    ingest_cmd.set_defaults(func=ingest_command)

    from serving.cli.deploy import add_commands

    add_commands(commands)

    bench_cmd = commands.add_parser(
        "bench", help="Locust benchmarks: run a scenario, compare two runs (--help for each)"
    )
    bench_cmd.add_argument("bench_command", choices=["run", "compare"])
    bench_cmd.add_argument("rest", nargs=argparse.REMAINDER)
    bench_cmd.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
