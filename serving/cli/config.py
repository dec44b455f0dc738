"""The configuration a ``weir`` command runs with (``--config``, else the built-in one)."""

from __future__ import annotations

import argparse

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
