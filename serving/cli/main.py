"""The ``weir`` command: ``weir serve``, ``weir models pull|list|verify``, ``weir bench``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.cli import (
    adapters,
    bench,
    deploy,
    engines,
    ingest,
    keys,
    limits,
    model_store,
    placement,
    retrieval,
    scrape,
    serve,
    usage,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="weir.toml (default: built-in)")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (
        serve,
        engines,
        model_store,
        adapters,
        keys,
        limits,
        usage,
        scrape,
        ingest,
        deploy,
        bench,
        placement,
        retrieval,
    ):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
