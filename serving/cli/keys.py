"""``weir keys create|list|revoke``, on the configured key store (Redis or the file)."""

from __future__ import annotations

import argparse
from typing import Any

from serving.cli.config import load, run_reporting


def keys(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from serving.keys.issue import KeyCreate, create_key
    from serving.keys.store import KeyStoreUnavailable, UnknownKey, make_key_store

    config = load(args).keys
    store = make_key_store(config.file, config.redis_url, config.timeout_s)

    async def run() -> None:
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
                budget_day=args.budget_day,
                budget_month=args.budget_month,
                budget_total=args.budget_total,
                tenant=args.tenant,
                weight=args.weight,
                priority=args.priority,
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

    return run_reporting(run, store.aclose, (KeyStoreUnavailable, UnknownKey))


def add_commands(commands: Any) -> None:
    keys_cmd = commands.add_parser("keys", help="API keys: create, list, revoke")
    key_commands = keys_cmd.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key; prints its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--models", default="", help="comma-separated; default: every model")
    for flag in ("--rpm", "--tpm", "--tokens-per-day", "--max-concurrency"):
        create.add_argument(flag, type=int, default=None)
    for flag in ("--budget-day", "--budget-month", "--budget-total"):
        create.add_argument(flag, type=float, default=None, help="dollars (UTC day, month, all)")
    create.add_argument("--no-cache", action="store_true", help="never use the response cache")
    create.add_argument(
        "--cache-namespace", default=None, help="keys with the same namespace share cached answers"
    )
    create.add_argument("--tenant", default=None, help="fair-queue tenant (team) it shares")
    create.add_argument("--weight", type=float, default=1.0, help="its fair share's weight")
    create.add_argument(
        "--priority", choices=("interactive", "batch"), default="interactive",
        help="batch: its requests take only the room interactive traffic leaves",
    )  # fmt: skip
    key_commands.add_parser("list", help="keys and their limits, never secrets")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys_cmd.set_defaults(func=keys)
