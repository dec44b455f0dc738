"""The configuration a ``weir`` command runs with (``--config``, else the built-in one),
and how a command that talks to a store runs and reports."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from serving.settings import Settings, load_settings


def load(args: argparse.Namespace) -> Settings:
    """The settings, or a clean exit naming what is wrong with the file."""
    from pydantic import ValidationError

    try:
        return load_settings(args.config)
    except FileNotFoundError as exc:
        raise SystemExit(f"weir: {exc}") from None
    except ValidationError as exc:
        raise SystemExit(f"weir: invalid configuration: {exc}") from None


def run_reporting(
    work: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    errors: tuple[type[Exception], ...],
) -> int:
    """Run ``work`` then always ``close``; one of ``errors`` is said as ``weir: ...`` and
    exits 1 (a store that is down, a key that is not there), anything else is a bug."""

    async def run() -> int:
        try:
            await work()
        except errors as exc:
            print(f"weir: {exc}", file=sys.stderr)
            return 1
        finally:
            await close()
        return 0

    return asyncio.run(run())
