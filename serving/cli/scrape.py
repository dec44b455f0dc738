"""``weir scrape-targets``: the engines' ``/metrics`` as a Prometheus file_sd list."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from serving.cli.config import load


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
    from serving.cli.admin_client import AdminCallFailed, AdminClient

    settings = load(args)
    client = AdminClient.from_settings(settings, args.url)  # engine URLs: the admin key
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


def add_commands(commands: Any) -> None:
    targets = commands.add_parser(
        "scrape-targets", help="the engines' /metrics as Prometheus file_sd JSON"
    )
    targets.add_argument("--url", default=None, help="gateway base URL (default: the config's)")
    targets.add_argument("--out", default=None, help="write here instead of stdout")
    targets.set_defaults(func=scrape_targets)
