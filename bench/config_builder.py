"""The ``weir.toml`` files that benchmarks and tests start ``weir serve`` with, built from
Python values instead of format strings.

``weir_toml`` writes the sections in the order given, then ``[[models]]``; ``model`` is a
served model with one version, the shape nearly every rig uses::

    weir_toml(
        gateway={"port": port},
        engines={"log_dir": logs},
        models=[model("smollm2", "mock", url=f"http://127.0.0.1:{mock}")],
    )

A ``None`` value leaves its key out (TOML has no null). Benchmarks and tests both use this
module; it imports nothing of either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def model(
    name: str,
    version: str,
    *,
    task: str = "chat",
    routing: Mapping[str, Any] | None = None,
    timeouts: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """``name`` with one version, its current: ``fields`` are the version's (``url``,
    ``urls``, ``weights``, ``engine_args``, ``tokenizer``...)."""
    return {
        "name": name,
        "task": task,
        "current": version,
        "routing": routing,
        "timeouts": timeouts,
        "versions": [{"version": version, **fields}],
    }


def weir_toml(*, models: Sequence[Mapping[str, Any]] = (), **sections: Any) -> str:
    """A configuration file: ``sections`` (``gateway={...}``, ``keys={...}``...), then
    one ``[[models]]`` table per model."""
    return render({**sections, **({"models": list(models)} if models else {})})


def render(config: Mapping[str, Any]) -> str:
    """TOML for ``config``: tables, arrays of tables, and scalars or lists of them."""
    lines: list[str] = []
    _table(None, config, lines)
    return "\n".join(lines) + "\n"


def _table(
    path: str | None, table: Mapping[str, Any], lines: list[str], array: bool = False
) -> None:
    if path is not None:
        if lines:
            lines.append("")
        lines.append(f"[[{path}]]" if array else f"[{path}]")
    nested = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping) or _is_tables(value):
            nested.append((key, value))
        else:
            lines.append(f"{key} = {_value(value)}")
    for key, value in nested:
        inner = key if path is None else f"{path}.{key}"
        if isinstance(value, Mapping):
            _table(inner, value, lines)
        else:
            for item in value:
                _table(inner, item, lines, array=True)


def _is_tables(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], Mapping)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON's string escapes are TOML's
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return "[" + ", ".join(_value(v) for v in items) + "]"
    raise TypeError(f"no TOML for {value!r}")
