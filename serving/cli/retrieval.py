"""``weir retrieval serve``: an index worker holding shards of the collections in the
shared docstore (``retrieval.database_url``, PostgreSQL) and answering the gateways'
searches of them (``retrieval.index_workers = true`` on the gateways)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from typing import Any

from serving.cli.config import load


def serve_command(args: argparse.Namespace) -> int:
    from retrieval.docstore import DocStore
    from retrieval.index import IndexParams
    from retrieval.worker import IndexWorker
    from retrieval.worker_http import serve
    from serving.errors import render
    from serving.log_config import configure

    settings = load(args)
    config = settings.retrieval
    if config.database_url is None:
        raise SystemExit("weir: an index worker needs retrieval.database_url (PostgreSQL)")
    configure(args.log_level)
    worker_id = args.id or socket.gethostname()
    url = args.url or f"http://{socket.gethostname()}:{args.port}"
    worker = IndexWorker(
        DocStore(config.database_url.get_secret_value()), config.path.expanduser(), worker_id,
        url, params=IndexParams(config.index), lease_s=config.worker_lease_s,
        snapshot_every=config.snapshot_every,
    )  # fmt: skip
    token = config.worker_token
    running = serve(
        worker, args.host, args.port, render=render,
        token=None if token is None else token.get_secret_value(),
        follow_interval_s=config.follow_interval_s,
        window_s=config.batch_window_ms / 1000, max_batch=config.max_batch,
    )  # fmt: skip
    asyncio.run(running)
    return 0


def add_commands(commands: Any) -> None:
    group = commands.add_parser("retrieval", help="retrieval index workers")
    sub = group.add_subparsers(dest="retrieval_command", required=True)
    cmd = sub.add_parser("serve", help="run an index worker (holds shards, answers searches)")
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=8100)
    cmd.add_argument(
        "--id",
        default=os.environ.get("WEIR_WORKER_ID"),
        help="this worker's name in the placement (default: the host name)",
    )
    cmd.add_argument(
        "--url",
        default=os.environ.get("WEIR_WORKER_URL"),
        help="where gateways reach it (default: http://HOSTNAME:PORT)",
    )
    cmd.add_argument("--log-level", default="INFO")
    cmd.set_defaults(func=serve_command)
