"""Ingests and deletes documents, printing what each acknowledged call made durable.

Run by the crash test, which kills it with SIGKILL at random moments:
``python -m tests.retrieval_crash_worker DIR START COUNT [DATABASE_URL]`` (no URL: the
docstore in SQLite under DIR)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from retrieval.index import IndexParams
from retrieval.service import Document, Retrieval
from tests.fakes.embedder import DIM, embed, split


async def main(root: Path, start: int, count: int, database: str | None) -> None:
    service = Retrieval(
        root, embed, split, DIM, params=IndexParams("flat"), snapshot_every=7, database=database
    )
    service.open()
    if not service.docstore.collections("t"):
        await service.create_collection("t", "docs")
    for n in range(start, start + count):
        doc_id = f"doc-{n}"
        await service.upsert("t", "docs", [Document(f"text of document {n}", doc_id, {"n": n})])
        print(f"ACK {doc_id}", flush=True)
        if n % 5 == 0 and n - 3 >= start:
            gone = f"doc-{n - 3}"
            print(f"DELETING {gone}", flush=True)  # in flight: either outcome is right
            await service.delete_document("t", "docs", gone)
            print(f"DEL {gone}", flush=True)
    await service.close()


if __name__ == "__main__":
    url = sys.argv[4] if len(sys.argv) > 4 else None
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), url))
