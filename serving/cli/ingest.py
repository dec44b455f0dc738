"""``weir ingest PATH --collection C``: files into a collection, through the gateway's API.

Reads ``.txt`` and ``.md`` files (one document each, id = the path relative to PATH) and
``.jsonl`` files (one document a line: ``{"id"?, "text", "metadata"?}``), and posts them
in batches to ``/v1/collections/C/documents`` with the caller's key, showing progress.
Going through the API means the same tenant rules, chunking and embedding cache as any
client; an acknowledged batch is durable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from serving.cli.config import load

SUFFIXES = (".txt", ".md", ".jsonl")


class Poster(Protocol):
    """What ingest needs of an HTTP client (httpx's, or Starlette's test client)."""

    def post(self, url: str, *, json: Any = None) -> Any: ...


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def read_documents(path: Path, root: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}:{number}: each line needs a "text" string')
            document = {"text": row["text"], "metadata": row.get("metadata") or {}}
            if row.get("id") is not None:
                document["id"] = str(row["id"])
            document["metadata"].setdefault("source", str(path))
            yield document
        return
    name = str(path.relative_to(root)) if path != root else path.name
    text = path.read_text()
    if text.strip():
        yield {"id": name, "text": text, "metadata": {"source": name}}


def ingest(
    client: Poster, collection: str, path: Path, *, batch: int = 32, show: bool = True
) -> int:
    """Every document under ``path`` into ``collection`` (made if missing); how many."""
    from rich.progress import Progress

    made = client.post("/v1/collections", json={"name": collection})
    if made.status_code not in (201, 409):
        made.raise_for_status()
    files = files_under(path)
    root = path if path.is_dir() else path.parent
    sent = 0
    with Progress(disable=not show) as progress:
        task = progress.add_task(f"ingest into {collection}", total=len(files))
        pending: list[dict[str, Any]] = []
        for file in files:
            for document in read_documents(file, root):
                pending.append(document)
                if len(pending) == batch:
                    sent += _post(client, collection, pending)
                    pending = []
            progress.advance(task)
        if pending:
            sent += _post(client, collection, pending)
    return sent


def _post(client: Poster, collection: str, documents: list[dict[str, Any]]) -> int:
    answer = client.post(f"/v1/collections/{collection}/documents", json={"documents": documents})
    if answer.status_code != 200:
        raise RuntimeError(f"the gateway refused a batch: {answer.status_code} {answer.text}")
    return len(answer.json()["ids"])


def ingest_command(args: argparse.Namespace) -> int:
    """``weir ingest PATH --collection C``, with ``WEIR_API_KEY`` as the caller's key."""
    import os

    import httpx

    settings = load(args)
    base = args.url or f"http://{settings.gateway.host}:{settings.gateway.port}"
    key = os.environ.get("WEIR_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if not args.path.exists():
        print(f"weir: {args.path} does not exist", file=sys.stderr)
        return 2
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            count = ingest(client, args.collection, args.path, batch=args.batch)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        print(f"weir: ingest failed: {exc}", file=sys.stderr)
        return 1
    print(f"weir: {count} documents in {args.collection}")
    return 0


def add_commands(commands: Any) -> None:
    ingest_cmd = commands.add_parser(
        "ingest", help="add .txt/.md/.jsonl files to a collection (WEIR_API_KEY as the key)"
    )
    ingest_cmd.add_argument("path", type=Path)
    ingest_cmd.add_argument("--collection", required=True)
    ingest_cmd.add_argument("--url", default=None, help="gateway base URL (default: the config's)")
    ingest_cmd.add_argument("--batch", type=int, default=32, help="documents per request")
    ingest_cmd.set_defaults(func=ingest_command)
