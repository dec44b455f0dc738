"""``weir engines``: the host's engines in one supervisor process, published on a board.

Gateways started with ``engines.board`` set to the same file (``WEIR_ENGINES__BOARD``)
use these engines; ``weir serve --workers N`` starts this process and N such workers.
It follows the rollout state (``serving.rollout.shared``) where one is configured, so a
deploy through any worker starts and stops the engines here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from models.engines.board import BoardWriter
from models.engines.client import EngineTimeouts
from models.engines.engine_host import EngineHost, local_only
from models.engines.launcher import ReplicaFactory, check_weights
from models.errors import StoreError
from serving.cli.config import load
from serving.settings import Settings

log = logging.getLogger("weir.engines")
DEFAULT_BOARD = Path("~/.cache/weir/fleet.json")


def engines(args: argparse.Namespace) -> int:
    from serving.log_config import configure

    settings = load(args)
    configure(args.log_level, settings.observability.log_format)
    board = args.board or settings.engines.board or DEFAULT_BOARD
    try:
        return asyncio.run(supervise(settings, board.expanduser(), watch_stdin=args.watch_stdin))
    except StoreError as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 1


async def supervise(settings: Settings, board: Path, *, watch_stdin: bool = False) -> int:
    """Run until SIGTERM/SIGINT (or, with ``watch_stdin``, until stdin closes: the parent
    that started us has gone), then stop every engine."""
    from serving.rollout.shared import follow_for_engines

    weights = await asyncio.to_thread(check_weights, local_only(settings.models), settings.store)
    factory = ReplicaFactory(
        settings.engines, EngineTimeouts(health_s=settings.engines.health_timeout_s)
    )
    host = EngineHost(
        settings.models, weights, factory, BoardWriter(board), settings.store,
        retire_after_s=settings.engines.retire_after_s,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[Any]] = []
    if watch_stdin:
        tasks.append(asyncio.create_task(_until_eof(stop), name="parent watch"))
    follower = follow_for_engines(settings, host)
    if follower is not None:
        tasks.append(asyncio.create_task(follower, name="rollout follower"))
    print(f"weir: engines published on {board}", flush=True)
    try:
        await host.run(stop, ready=lambda: print("weir: engines ready", flush=True))
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return 0


async def _until_eof(stop: asyncio.Event) -> None:
    await asyncio.to_thread(sys.stdin.buffer.read)
    log.warning("the process that started us is gone; stopping the engines")
    stop.set()


def add_commands(commands: Any) -> None:
    cmd = commands.add_parser(
        "engines", help="start and watch the local engines for gateway workers (a supervisor)"
    )
    cmd.add_argument("--board", type=Path, default=None, help=f"default: {DEFAULT_BOARD}")
    cmd.add_argument("--log-level", default="INFO")
    cmd.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    cmd.set_defaults(func=engines)
