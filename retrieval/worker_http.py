"""The index worker's HTTP side (aiohttp): ``POST /search`` for one shard, ``GET
/health``; and ``serve``, which runs a worker until it is told to stop.

A search carries its query as base64 float32 (``vector``), ``k`` and ``min_seq`` (0, or
the collection's head for strong consistency); the answer is the shard's top ``k`` ids
and scores. A shard this worker does not hold is a 409 (the gateway looks up the owner
again). Concurrent searches of a shard are batched (``retrieval.batcher``), from every
gateway together.

Only the gateways may ask: with ``retrieval.worker_token`` set, ``POST /search`` needs it
as a bearer token (compared in constant time) and answers 401 without it, an OpenAI
error rendered by the ``render`` handed in (the gateway's one error table); ``GET
/health`` answers anyone (Kubernetes' probes carry no secret) but names the held shards,
tenants' collections, only to a caller with the token. No token: a worker answers
whoever reaches its port, and warns at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from retrieval.batcher import SearchBatcher
from retrieval.errors import WorkerUnauthenticated
from retrieval.service import Follower
from retrieval.wire import decode
from retrieval.worker import IndexWorker, NotHeld, ShardKey

log = logging.getLogger("weir.retrieval.worker")
MAX_K = 2048  # FAISS's largest k on a GPU
MAX_BODY = 1 << 20
# an error as HTTP: status, OpenAI error body, headers (serving.errors.render)
Render = Callable[[BaseException, str], tuple[int, dict[str, Any], dict[str, str]]]


class WorkerApp:
    def __init__(
        self,
        worker: IndexWorker,
        *,
        render: Render,
        token: str | None = None,
        window_s: float = 0.001,
        max_batch: int = 64,
    ) -> None:
        self.worker = worker
        self.render = render
        self._token = None if token is None else token.encode()
        self.window_s = window_s
        self.max_batch = max_batch
        self._batchers: dict[ShardKey, SearchBatcher] = {}

    def __repr__(self) -> str:
        return f"WorkerApp({self.worker!r})"

    def app(self) -> web.Application:
        if self._token is None:
            log.warning(
                "index worker %s: no retrieval.worker_token, so it answers searches from"
                " anyone who reaches its port; set the same token on gateways and workers",
                self.worker.worker_id,
            )
        made = web.Application(client_max_size=MAX_BODY)
        made.router.add_post("/search", self.search)
        made.router.add_get("/health", self.health)
        return made

    def _caller_problem(self, request: web.Request) -> str | None:
        """Why the caller may not search (None: it may): no token, or not ours."""
        if self._token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "no bearer token"
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token):
            return "a bearer token that is not retrieval.worker_token"
        return None

    def _refused(self, request: web.Request, problem: str) -> web.Response:
        exc = WorkerUnauthenticated(
            f"This index worker answers the gateways only; the request carried {problem}"
            " (gateways and index workers must share retrieval.worker_token)."
        )
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        status, body, headers = self.render(exc, request_id)
        return web.json_response(body, status=status, headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        answer: dict[str, Any] = {"worker": self.worker.worker_id}
        if self._caller_problem(request) is None:  # shard names are tenants' collections
            answer["shards"] = sorted(str(k) for k in self.worker.held)
        return web.json_response(answer)

    async def search(self, request: web.Request) -> web.Response:
        problem = self._caller_problem(request)
        if problem is not None:
            return self._refused(request, problem)
        try:
            body: dict[str, Any] = await request.json()
            key = ShardKey(str(body["tenant"]), str(body["collection"]), int(body["shard"]))
            k, min_seq = int(body["k"]), int(body.get("min_seq", 0))
            if not 1 <= k <= MAX_K:
                raise ValueError(f"k must be 1..{MAX_K}")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad search: {exc}"}, status=400)
        try:
            index = await asyncio.to_thread(self.worker.index, key, min_seq)
            vector = decode(str(body.get("vector", "")), index.dim)
        except NotHeld:
            return web.json_response({"error": f"shard {key} is not held here"}, status=409)
        except ValueError as exc:
            return web.json_response({"error": f"bad vector: {exc}"}, status=400)
        try:
            scores, ids = await self._batcher(key).search(vector, k)
        except NotHeld:  # dropped while the query waited for its batch
            return web.json_response({"error": f"shard {key} is not held here"}, status=409)
        return web.json_response({"ids": ids[0].tolist(), "scores": scores[0].tolist(),
                                  "seq": index.seq})  # fmt: skip

    def _batcher(self, key: ShardKey) -> SearchBatcher:
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = SearchBatcher(
                lambda vectors, k: self.worker.index(key).search(vectors, k),
                window_s=self.window_s, max_batch=self.max_batch,
            )  # fmt: skip
            self._batchers[key] = batcher
        return batcher


async def serve(
    worker: IndexWorker,
    host: str,
    port: int,
    *,
    render: Render,
    token: str | None = None,
    follow_interval_s: float = 0.25,
    window_s: float = 0.001,
    max_batch: int = 64,
) -> None:
    """Run ``worker`` until SIGTERM or SIGINT: the HTTP server, its placement rounds
    every ``lease_s / 3`` and the log follower; on the way out it gives its shards up."""
    made = WorkerApp(worker, render=render, token=token, window_s=window_s, max_batch=max_batch)
    runner = web.AppRunner(made.app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    follower = Follower(worker.sync, worker.docstore.db, follow_interval_s)
    follower.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("index worker %s on %s:%d", worker.worker_id, host, port)
    try:
        while not stop.is_set():
            try:
                await asyncio.to_thread(worker.heartbeat)
            except Exception as exc:  # the database away for a moment: try next round
                log.warning("placement round failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), worker.lease_s / 3)
    finally:
        await asyncio.to_thread(follower.stop)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(worker.leave)
        await runner.cleanup()
        worker.docstore.close()
