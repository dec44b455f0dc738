"""Index workers answer the gateways only (issue 28): ``retrieval.worker_token``.

An index worker (``retrieval.worker_http``, in this process on a loopback port) and a
gateway's scatter (``retrieval.scatter``) on a real PostgreSQL docstore. With a token,
a search without it or with another is a 401 OpenAI error from the gateway's one error
table and the held shards are not named to such a caller; the gateway's scatter, with
the same token, is answered. Without a token a worker answers anyone and says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiohttp import web

from retrieval.docstore import DocStore
from retrieval.errors import ShardUnavailable
from retrieval.scatter import Scatter
from retrieval.service import Document, Retrieval
from retrieval.wire import encode
from retrieval.worker import IndexWorker
from retrieval.worker_http import WorkerApp
from serving.errors import render
from tests.fakes.embedder import DIM, embed, split, vector
from tests.retrieval_db import fresh_database

TOKEN = "worker-token-for-the-tests-0123456789"
TEXT = "the index worker holds this passage"


@asynccontextmanager
async def fleet(
    tmp_path: Path, postgres_url: str, token: str | None, gateway_token: str | None
) -> AsyncIterator[tuple[str, Retrieval]]:
    """A worker with ``token`` holding the one shard of t/c (one document, ``TEXT``) and
    a gateway that scatters to it with ``gateway_token``: the worker's URL and the
    gateway's service."""
    with fresh_database(postgres_url) as url:
        worker = IndexWorker(DocStore(url), tmp_path / "worker", "w0", "", lease_s=5.0)
        runner = web.AppRunner(WorkerApp(worker, render=render, token=token).app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        worker.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        scatter = Scatter(timeout_s=2.0, takeover_s=10.0, token=gateway_token)
        gateway = Retrieval(tmp_path / "gateway", embed, split, DIM, database=url, scatter=scatter)
        gateway.open()
        try:
            await gateway.create_collection("t", "c", shards=1)
            await gateway.upsert("t", "c", [Document(TEXT, "held")])
            await asyncio.to_thread(worker.heartbeat)  # loads the shard and claims it
            yield worker.url, gateway
        finally:
            await gateway.close()
            await runner.cleanup()
            worker.docstore.close()


def search_body() -> dict[str, Any]:
    return {
        "tenant": "t",
        "collection": "c",
        "shard": 0,
        "k": 1,
        "vector": encode(np.asarray(vector(TEXT))),
    }


async def ask(base: str, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{base}/search", json=search_body(), headers=headers)


@pytest.mark.anyio
async def test_a_worker_refuses_a_search_without_the_token_and_answers_with_it(
    tmp_path: Path, postgres_url: str
) -> None:
    async with fleet(tmp_path, postgres_url, TOKEN, TOKEN) as (base, gateway):
        for headers in (
            {},
            {"authorization": "Bearer not-the-worker-token-at-all"},
            {"authorization": f"Bearer {TOKEN}x"},
            {"authorization": TOKEN},  # no scheme
            {"authorization": f"Basic {TOKEN}"},
        ):
            refused = await ask(base, headers)
            assert refused.status_code == 401, (headers, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_worker_token"
            assert "retrieval.worker_token" in error["message"]
            assert TOKEN not in refused.text
        answered = await ask(base, {"authorization": f"Bearer {TOKEN}"})
        assert answered.status_code == 200, answered.text
        assert len(answered.json()["ids"]) == 1
        async with httpx.AsyncClient(timeout=10) as client:
            health = (await client.get(f"{base}/health")).json()
            assert health == {"worker": "w0"}  # probes get an answer, not the shards
            health = (
                await client.get(f"{base}/health", headers={"authorization": f"Bearer {TOKEN}"})
            ).json()
            assert health == {"worker": "w0", "shards": ["t/c/0"]}
        # the gateway's scatter carries the token: its search is answered
        hits = await gateway.search("t", "c", TEXT, top_k=1)
        assert [h.document_id for h in hits] == ["held"]


@pytest.mark.anyio
async def test_a_gateway_with_another_token_fails_at_once_saying_why(
    tmp_path: Path, postgres_url: str
) -> None:
    other = "a-token-of-another-fleet"
    async with fleet(tmp_path, postgres_url, TOKEN, other) as (_, gateway):
        started = time.monotonic()
        with pytest.raises(
            ShardUnavailable, match=r"refused this gateway's retrieval\.worker_token"
        ):
            await gateway.search("t", "c", TEXT, top_k=1)
        assert time.monotonic() - started < 2.0  # not retried until takeover_s (10 s)


@pytest.mark.anyio
async def test_without_a_token_a_worker_answers_anyone_and_warns_at_start(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="weir.retrieval.worker"):
        async with fleet(tmp_path, postgres_url, None, None) as (base, gateway):
            assert (await ask(base, {})).status_code == 200
            hits = await gateway.search("t", "c", TEXT, top_k=1)
            assert [h.document_id for h in hits] == ["held"]
    assert any("no retrieval.worker_token" in r.getMessage() for r in caplog.records)
