"""A 2-shard collection on two index workers (``weir retrieval serve``) and PostgreSQL.

The gateway's side is the retrieval service in scatter mode (what ``weir serve`` runs
with ``retrieval.index_workers = true``); the truth is a service holding the whole
collection as one index, on the same docstore. The top 10 of every query are the same
(recall 1.0: the indexes are flat); after one worker is killed with SIGKILL, its shard
is taken over by the other and searches go on answering, with the same results.
The workers and the gateway share ``retrieval.worker_token``: a search without it is
refused (401).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.config_builder import weir_toml
from bench.procs import start, stop_all, wait_for, weir_command
from retrieval.scatter import Scatter
from retrieval.service import Document, Retrieval
from retrieval.worker import ShardKey, rendezvous
from tests import ports
from tests.fakes.embedder import DIM, embed, split
from tests.retrieval_db import fresh_database

LEASE_S = 1.0
TOKEN = "shards-test-worker-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# the database's URL, and each worker's process and base URL by name
Workers = tuple[str, dict[str, tuple[subprocess.Popen[bytes], str]]]


def two_that_split() -> tuple[str, str]:
    """Two worker names that rendezvous hashing gives one shard each of t/c."""
    names = [f"worker-{n}" for n in range(10)]
    for first in names:
        for second in names:
            pair = sorted([first, second])
            owners = {rendezvous(ShardKey("t", "c", s), pair) for s in (0, 1)}
            if first != second and len(owners) == 2:
                return first, second
    raise AssertionError("no pair of names splits the shards")


@pytest.fixture
def workers(tmp_path: Path, postgres_url: str) -> Iterator[Workers]:
    with fresh_database(postgres_url) as url:
        procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for name in two_that_split():
                config = tmp_path / f"{name}.toml"
                config.write_text(weir_toml(retrieval={
                    "path": tmp_path / name, "database_url": url, "worker_lease_s": LEASE_S,
                    "worker_token": TOKEN,
                }))  # fmt: skip

                def spawn(
                    port: int, name: str = name, config: Path = config
                ) -> subprocess.Popen[bytes]:
                    return start(
                        [weir_command(), "--config", str(config), "retrieval", "serve",
                         "--port", str(port), "--id", name, "--url", f"http://127.0.0.1:{port}"],
                        tmp_path / f"{name}.log",
                    )  # fmt: skip

                def log(_: int, name: str = name) -> Path:
                    return tmp_path / f"{name}.log"

                process, port = ports.listening_process(spawn, log)
                procs[name] = (process, f"http://127.0.0.1:{port}")
                wait_for(f"http://127.0.0.1:{port}/health")
            yield url, procs
        finally:
            stop_all([p for p, _ in procs.values() if p.poll() is None])


def held(base: str) -> list[str]:
    return list(httpx.get(f"{base}/health", headers=AUTH).json()["shards"])


@pytest.mark.anyio
async def test_two_shards_on_two_workers_answer_as_one_index_and_survive_a_kill(
    tmp_path: Path, workers: Workers
) -> None:
    url, procs = workers
    gateway = Retrieval(tmp_path / "gateway", embed, split, DIM, database=url,
                        scatter=Scatter(timeout_s=2.0, takeover_s=30.0, token=TOKEN))  # fmt: skip
    whole = Retrieval(tmp_path / "whole", embed, split, DIM, database=url)
    gateway.open()
    whole.open(follow=False)
    try:
        await gateway.create_collection("t", "c", shards=2)
        for at in range(0, 600, 100):
            await gateway.upsert("t", "c", [Document(f"passage {n} on topic {n % 37}", f"d{n}")
                                            for n in range(at, at + 100)])  # fmt: skip
        queries = [f"passage {n} on topic {n % 37}" for n in range(0, 600, 20)]

        async def compare() -> float:
            same = 0
            for query in queries:
                sharded = await gateway.search("t", "c", query, top_k=10)
                one = await whole.search("t", "c", query, top_k=10)
                assert [h.id for h in sharded] == [h.id for h in one]
                assert [h.score for h in sharded] == pytest.approx([h.score for h in one], abs=1e-6)
                same += len({h.id for h in sharded} & {h.id for h in one})
            return same / (10 * len(queries))

        recall = await compare()  # the first search waits until both shards are claimed
        shards = {name: held(base) for name, (_, base) in procs.items()}
        assert sorted(len(s) for s in shards.values()) == [1, 1], shards
        async with httpx.AsyncClient() as client:  # `weir retrieval serve` took the token
            for _, base in procs.values():
                body = {"tenant": "t", "collection": "c", "shard": 0, "k": 1, "vector": ""}
                refused = await client.post(f"{base}/search", json=body)
                assert refused.status_code == 401, refused.text
                assert refused.json()["error"]["code"] == "invalid_worker_token"
        victim = next(name for name, s in shards.items() if s == ["t/c/0"])
        survivor = next(name for name in procs if name != victim)
        procs[victim][0].send_signal(signal.SIGKILL)
        procs[victim][0].wait()
        killed = time.monotonic()
        answer = await gateway.search("t", "c", queries[0], top_k=10)  # waits for takeover
        takeover_s = time.monotonic() - killed
        assert answer[0].document_id == "d0"
        assert held(procs[survivor][1]) == ["t/c/0", "t/c/1"]
        assert await compare() == 1.0
        await gateway.upsert("t", "c", [Document("written after the takeover", "late")])
        late = await gateway.search("t", "c", "written after the takeover", top_k=1)
        assert late[0].document_id == "late"  # strong: the worker caught up first
        print(
            f"\nrecall@10 sharded vs one index: {recall:.3f}; takeover after SIGKILL:"
            f" first full answer {takeover_s:.2f} s after the kill (lease {LEASE_S} s)"
        )
        assert recall == 1.0
    finally:
        await gateway.close()
        await whole.close()
