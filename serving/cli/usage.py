"""``weir usage``: requests, tokens and cost per day, model or version, from the ledger
database the configuration names (no gateway needed; rows a running gateway still holds
in memory or in its spill file are not in it yet)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from serving.cli.config import load


def usage(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy.exc import SQLAlchemyError

    from serving.ledger.report import parse_since, usage_report
    from serving.ledger.writer import make_engine

    settings = load(args)
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(settings.ledger)
    try:
        report = usage_report(engine, since=since, by=args.by, key=args.key, team=args.team)
    except SQLAlchemyError as exc:
        print(f"weir: the ledger database cannot be read: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if args.csv:
        sys.stdout.write(report.csv())
        return 0
    who = f"key {args.key}" if args.key else f"team {args.team}" if args.team else "all keys"
    table = Table(title=f"Usage of {who} since {args.since}, by {args.by}")
    for column in (args.by, "requests", "prompt", "completion", "cached", "cost ($)"):
        table.add_column(column, justify="left" if column == args.by else "right")
    for line in [*report.lines, report.total]:
        table.add_row(
            line.group, str(line.requests), str(line.prompt_tokens),
            str(line.completion_tokens), str(line.cached_tokens), line.cost_usd,
        )  # fmt: skip
    Console(width=max(120, Console().width)).print(table)
    return 0


def add_commands(commands: Any) -> None:
    cmd = commands.add_parser("usage", help="requests, tokens and cost from the usage ledger")
    who = cmd.add_mutually_exclusive_group()
    who.add_argument("--key", default=None, help="a key id (weir keys list)")
    who.add_argument("--team", default=None, help="a team (a key's tenant)")
    cmd.add_argument("--since", default="7d", help="7d, 12h, 30m or a unix time (default 7d)")
    cmd.add_argument("--by", choices=("day", "model", "version", "key", "team"), default="day")
    cmd.add_argument("--csv", action="store_true", help="CSV on stdout")
    cmd.set_defaults(func=usage)
