"""``weir limits show|set``: per-model token budgets, in Redis for every gateway, or
through the running gateway's admin API when limits are in-process."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from serving.cli.config import load, run_reporting
from serving.settings import Settings


def limits(args: argparse.Namespace) -> int:
    settings = load(args)
    url = settings.limits.store_url(settings.keys)
    tpm = None if args.limits_command == "show" or args.clear else args.tpm
    if args.limits_command == "set" and (tpm is None or tpm < 0) and not args.clear:
        print("weir: give --tpm N (N >= 0) or --clear", file=sys.stderr)
        return 2
    if url is None:
        return _limits_over_http(settings, args.limits_command, args.model, tpm)

    from serving.limits.limiter import Limiter
    from serving.limits.redis_store import RedisLimitStore
    from serving.limits.store import LimitStoreUnavailable
    from serving.limits.view import limits_view

    limiter = Limiter(RedisLimitStore(url, timeout_s=settings.limits.timeout_s))

    async def run() -> None:
        if args.limits_command == "set":
            await limiter.store.set_model_tpm(args.model, tpm)
            print(f"{args.model}: tokens per minute {tpm if tpm is not None else 'as configured'}")
        else:
            view = await limits_view(limiter, dict(settings.limits.model_tpm))
            print(json.dumps(view.model_dump(), indent=2))

    return run_reporting(run, limiter.aclose, (LimitStoreUnavailable,))


def _limits_over_http(settings: Settings, command: str, model: str | None, tpm: int | None) -> int:
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


def add_commands(commands: Any) -> None:
    limits_cmd = commands.add_parser("limits", help="per-model token budgets at runtime")
    limit_commands = limits_cmd.add_subparsers(dest="limits_command", required=True)
    limit_commands.add_parser("show", help="budgets and outstanding reservations")
    set_cmd = limit_commands.add_parser("set", help="change a model's tokens per minute now")
    set_cmd.add_argument("model")
    set_cmd.add_argument("--tpm", type=int, default=None, help="tokens per minute (0 stops it)")
    set_cmd.add_argument("--clear", action="store_true", help="back to the configured budget")
    limits_cmd.set_defaults(func=limits, model=None, clear=False, tpm=None)
