"""Two ``weir serve`` gateways on one PostgreSQL docstore (a mock embedding engine).

Gateway A answers searches from its replica as the follower left it (``eventual``);
gateway B is ``strong``: a search first catches up to the docstore's head. A document
added through one is found through the other: at once through B, through A within the
follower's lag (printed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from bench.config_builder import model, weir_toml
from bench.procs import stop_all, wait_for
from tests import ports
from tests.retrieval_db import fresh_database


def config(port: int, mock: int, path: Path, url: str, consistency: str) -> str:
    return weir_toml(
        gateway={"port": port},
        retrieval={
            "path": path,
            "embedding_model": "mock-embed",
            "database_url": url,
            "consistency": consistency,
            "follow_interval_s": 30,  # what wakes A's follower in time is NOTIFY
        },
        models=[model("mock-embed", "v", task="embed", url=f"http://127.0.0.1:{mock}")],
    )


@pytest.fixture
def gateways(tmp_path: Path, postgres_url: str) -> Iterator[tuple[str, str]]:
    engine, mock = ports.mock_engine(tmp_path)
    procs = [engine]
    with fresh_database(postgres_url) as url:
        try:
            wait_for(f"http://127.0.0.1:{mock}/health")
            bases = []
            for name, consistency in (("a", "eventual"), ("b", "strong")):
                text = partial(config, mock=mock, path=tmp_path / name, url=url,
                               consistency=consistency)  # fmt: skip
                made, base = ports.gateway(text, tmp_path, f"gateway-{name}")
                procs.append(made)
                bases.append(base)
            for base in bases:
                wait_for(f"{base}/readyz", 60)
            yield bases[0], bases[1]
        finally:
            stop_all(procs)


def found(base: str, text: str) -> str | None:
    answer = httpx.post(f"{base}/v1/collections/c/search", json={"query": text, "top_k": 1})
    answer.raise_for_status()
    data = answer.json()["data"]
    return data[0]["id"] if data else None


def test_two_gateways_one_postgresql(gateways: tuple[str, str]) -> None:
    a, b = gateways
    httpx.post(f"{a}/v1/collections", json={"name": "c"}).raise_for_status()
    lags = []
    for n in range(10):
        text = f"document {n} written through A"
        added = httpx.post(f"{a}/v1/collections/c/documents",
                           json={"documents": [{"id": f"a{n}", "text": text}]})  # fmt: skip
        added.raise_for_status()
        assert found(b, text) == f"a{n}"  # strong: found at once, no waiting
        added = httpx.post(f"{b}/v1/collections/c/documents",
                           json={"documents": [{"id": f"b{n}", "text": f"{n} via B"}]})  # fmt: skip
        added.raise_for_status()
        acked = time.monotonic()
        while found(a, f"{n} via B") != f"b{n}":  # eventual: within the follower's lag
            assert time.monotonic() - acked < 30, "not found through A within 30 s"
        lags.append(time.monotonic() - acked)
    lags.sort()
    floor = []
    for _ in range(10):
        started = time.monotonic()
        found(a, "0 via B")
        floor.append(time.monotonic() - started)
    floor.sort()
    print(
        f"\nB -> A: found through A {lags[5] * 1000:.0f} ms (p50),"
        f" {lags[-1] * 1000:.0f} ms (max) after B acknowledged; one search through A"
        f" takes {floor[5] * 1000:.0f} ms (p50)"
    )
    listed = httpx.get(f"{a}/v1/collections").json()["data"]
    assert listed == [{"name": "c", "shards": 1, "documents": 20, "chunks": 20}]
