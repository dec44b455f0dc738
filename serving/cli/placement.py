"""``weir placement``: which engine runs on which GPUs (and how much of their memory) or
which cores.

By default it asks the running gateway (``/weir/engines`` with the admin key: what runs
now, deploys included). ``--plan`` needs no gateway: it reads this host and plans the
configured running versions as ``weir serve`` would, starting nothing (a plan that does
not fit is said with its numbers, and exits 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from serving.cli.config import load


def rows_of(engines: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(engine, GPUs, memory fraction, cores, OpenMP binding) per local engine."""
    rows = []
    for engine in engines:
        where = engine.get("placement")
        if not where:
            rows.append((engine["replica"], "-", "-", "-", "remote" if not engine.get("local")
                         else "-"))  # fmt: skip
            continue
        gpus = ",".join(str(g) for g in where["gpus"]) or "-"
        fraction = f"{where['memory_fraction']:g}" if where["memory_fraction"] else "-"
        cores = _compact(where["cpus"])
        rows.append((where["replica"], gpus, fraction, cores, where["omp_threads_bind"] or "-"))
    return rows


def _compact(ids: list[int]) -> str:
    from models.engines.placement.types import core_list

    return core_list(ids) or "-"


def planned(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The plan ``weir serve`` would make on this host for the configured versions."""
    from models.engines.client import EngineTimeouts
    from models.engines.launcher import ReplicaFactory
    from models.engines.placement import plan
    from models.errors import StoreError
    from models.store import ModelStore

    settings = load(args)
    factory = ReplicaFactory(settings.engines, EngineTimeouts())
    store = ModelStore(settings.store.root)
    specs = []
    for model in settings.models:
        for version in model.versions:
            if version.version not in model.running() or version.weights is None:
                continue
            try:
                weights = store.resolve(version.weights)
            except StoreError:  # not pulled yet: planned on its KV budget alone
                weights = None
            specs.append(factory.spec(model, version, weights))
    host = factory.devices
    placements = plan(host, specs, cap=settings.engines.gpu_memory_cap)
    return [{"replica": str(p.replica), "local": True, "placement": p.view()} for p in placements]


def placement(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.plan:
        from models.engines.placement import PlacementRefused

        try:
            engines = planned(args)
        except PlacementRefused as exc:
            print(f"weir: does not fit: {exc}", file=sys.stderr)
            return 1
        title = "Placement planned on this host (nothing started)"
    else:
        from serving.cli.admin_client import AdminCallFailed, AdminClient

        client = AdminClient.from_settings(load(args), args.url)
        try:
            engines = client.call("GET", "/weir/engines")["data"]
        except (AdminCallFailed, KeyError, TypeError) as exc:
            print(f"weir: could not read {client.base}/weir/engines: {exc}", file=sys.stderr)
            return 1
        title = f"Placement at {client.base}"
    table = Table(title=title)
    for column in ("engine", "GPUs", "memory fraction", "cores", "OpenMP threads"):
        table.add_column(column)
    for row in rows_of(engines):
        table.add_row(*row)
    Console().print(table)
    return 0


def add_commands(commands: Any) -> None:
    cmd = commands.add_parser(
        "placement", help="which engine runs on which GPUs (memory fraction) or cores"
    )
    cmd.add_argument("--url", default=None, help="gateway base URL (default: the config's)")
    cmd.add_argument(
        "--plan", action="store_true", help="plan the configured versions here; no gateway"
    )
    cmd.set_defaults(func=placement)
