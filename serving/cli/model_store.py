"""``weir models pull|list|add|verify``: the local model store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models import catalog
from models.errors import StoreError
from models.store import ModelStore
from serving.cli.config import load


def _store(args: argparse.Namespace) -> ModelStore:
    settings = load(args)
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


def add_commands(commands: Any) -> None:
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
