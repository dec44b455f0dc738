"""``weir adapters add|list|remove|verify``: LoRA adapters in the store, and on a running
gateway.

``add`` checks the adapter against its base version (``--base MODEL[@VERSION]``) and
copies it into the store, or refuses with every reason; then, unless ``--offline``, it
asks the running gateway to load it into every engine of the base (no restart), and the
adapter serves as ``MODEL:NAME``. ``remove`` unloads it from the gateway first, then
deletes it from the store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models.adapters.bases import base_for
from models.adapters.store import AdapterStore
from models.errors import StoreError, WeirModelError
from serving.cli.admin_client import AdminCallFailed, AdminClient
from serving.cli.config import load


def _store(args: argparse.Namespace) -> AdapterStore:
    settings = load(args)
    return AdapterStore(args.store or settings.store.root)


def _gateway(args: argparse.Namespace) -> AdminClient:
    return AdminClient.from_settings(load(args), args.url)


def adapters_add(args: argparse.Namespace) -> int:
    settings = load(args)
    store = AdapterStore(args.store or settings.store.root)
    try:
        base = base_for(settings.models, args.base, settings.store)
        adapter = store.add(args.name, args.path.expanduser(), base)
    except WeirModelError as exc:
        print(f"weir: refused: {exc}", file=sys.stderr)
        return 1
    public = f"{base.model}:{adapter.name}"
    print(
        f"weir: {adapter.name} is in the store (rank {adapter.rank} on"
        f" {', '.join(adapter.targets)}, {adapter.bytes / 1e6:.1f} MB, sha256 verified),"
        f" for {base.model}@{base.version}"
    )
    version = next(m for m in settings.models if m.name == base.model).version(base.version)
    if not version.lora_enabled:
        print(
            f"weir: note: {base.model}@{base.version} starts its engines without LoRA; set"
            " lora = true (or list the adapter in adapters) on it to serve adapters"
        )
    if args.offline:
        return 0
    try:
        answer = _gateway(args).call("POST", "/weir/admin/adapters", {"name": adapter.name})
    except AdminCallFailed as exc:
        print(f"weir: not loaded on a running gateway: {exc}", file=sys.stderr)
        return 1
    print(f"weir: serving as {public} on {_replicas(answer)}")
    return 0


def _replicas(answer: Any) -> str:
    loaded = answer.get("replicas", []) if isinstance(answer, dict) else []
    return f"{len(loaded)} replicas ({', '.join(r['replica'] for r in loaded)})"


def adapters_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    store = _store(args)
    table = Table(title=f"Adapter store: {store.root}")
    for column in ("name", "served as", "base version", "rank", "targets", "size"):
        table.add_column(column)
    for adapter in store.entries():
        table.add_row(
            adapter.name, f"{adapter.base_model}:{adapter.name}",
            f"{adapter.base_model}@{adapter.base_version}", str(adapter.rank),
            ",".join(adapter.targets), f"{adapter.bytes / 1e6:.1f} MB",
        )  # fmt: skip
    Console().print(table)
    return 0


def adapters_remove(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        store.get(args.name)
    except StoreError as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 1
    if not args.offline:
        try:
            _gateway(args).call("DELETE", f"/weir/admin/adapters/{args.name}")
        except AdminCallFailed as exc:
            print(f"weir: the gateway did not unload it ({exc}); kept in the store."
                  " Use --offline when no gateway runs.", file=sys.stderr)  # fmt: skip
            return 1
    store.remove(args.name)
    print(f"weir: {args.name} removed")
    return 0


def adapters_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    failed = 0
    for name in args.names or [a.name for a in store.entries()]:
        try:
            adapter = store.verify(name)
            print(f"ok      {name} ({adapter.bytes / 1e6:.1f} MB, sha256 match)")
        except StoreError as exc:
            failed += 1
            print(f"FAILED  {exc}")
    return 1 if failed else 0


def add_commands(commands: Any) -> None:
    cmd = commands.add_parser("adapters", help="LoRA adapters: the store and a running gateway")
    cmd.add_argument("--store", type=Path, default=None, help="models store directory")
    sub = cmd.add_subparsers(dest="adapters_command", required=True)
    add = sub.add_parser("add", help="check, store and serve an adapter (no engine restart)")
    add.add_argument("name", help="the adapter's name; it serves as MODEL:NAME")
    add.add_argument("--base", required=True, help="MODEL or MODEL@VERSION it was trained on")
    add.add_argument("--path", type=Path, required=True, help="a PEFT LoRA adapter directory")
    add.add_argument("--url", default=None, help="the gateway (default: the configured one)")
    add.add_argument("--offline", action="store_true", help="store it only; load it on start")
    add.set_defaults(func=adapters_add)
    sub.add_parser("list", help="the adapters in the store").set_defaults(func=adapters_list)
    remove = sub.add_parser("remove", help="unload from the gateway, delete from the store")
    remove.add_argument("name")
    remove.add_argument("--url", default=None)
    remove.add_argument("--offline", action="store_true", help="no gateway runs: store only")
    remove.set_defaults(func=adapters_remove)
    verify = sub.add_parser("verify", help="check sizes and sha256 of adapter files")
    verify.add_argument("names", nargs="*")
    verify.set_defaults(func=adapters_verify)
