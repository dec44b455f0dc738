"""Running batches: every request through ``Proxy.handle`` at batch priority, durably.

Each gateway process looks for running batches every ``poll_s`` (and at once when one is
created here) and claims those no live process holds (``BatchStore.claim``: a lease of
``lease_s``, renewed every third of it). A claimed batch's lines without a result are
sent through the proxy with a ``Call`` for the batch's key at batch priority, so keys,
limits, the cache, metrics and the fair queue apply as to any request; at most
``concurrency`` at once per process. A 429 or 503 (the key's limits, an engine or queue at
capacity: batch requests wait for the room interactive traffic leaves) is tried again
after a back-off; any other answer, good or bad, is the line's result, written once.

A cancel (here or in another process, seen at the next renewal) or the completion window
running out (seen at a renewal, or when the batch is picked up: a batch resumed after its
window has passed sends nothing) stops the batch within a renewal: requests in flight are
cancelled (their engine calls aborted), and the lines without a result get a
``batch_cancelled`` or ``batch_expired`` error line. Then the output and error files are
written with the batch's final state in one transaction; they expire ``output_expires_s``
after they are written when the batch was created with ``output_expires_after``. A
gateway killed mid-batch leaves its lease to run out; the next claimant runs only what
has no result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serving.batches.lines import ENDPOINTS, new_id, output_line, unanswered_line
from serving.batches.store import BatchStore, Claimed, Line
from serving.core.answer import JsonAnswer
from serving.core.call import Call, Caller, never
from serving.core.proxy import Proxy
from serving.errors import BudgetExceeded, render
from serving.keys.records import KeyRecord
from serving.observe.metrics import Metrics
from serving.settings import BatchesConfig

log = logging.getLogger("weir.batches")
JSON = dict[str, Any]
PAGE = 256  # lines read at a time
RETRY = frozenset({429, 503})
KeyLookup = Callable[[str], Awaitable[KeyRecord | None]]  # key hash -> its record now


def caller_record(caller: Caller) -> JSON:
    """What a batch keeps of who created it."""
    key = caller.key.to_dict() if caller.key is not None else None
    return {"key": key, "static_key": caller.static_key}


@dataclass
class _Run:
    batch: JSON
    caller: Caller
    tenant: str
    output_expires_s: int | None = None  # its output files' lifetime (None: kept)
    stop: str | None = None  # "cancelled" or "expired" once it must stop
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def id(self) -> str:
        return str(self.batch["id"])

    def halt(self, why: str) -> None:
        if self.stop is None:
            self.stop = why
            for task in list(self.tasks):
                task.cancel()


class Runner:
    def __init__(
        self,
        proxy: Callable[[], Proxy],
        store: BatchStore,
        config: BatchesConfig,
        metrics: Metrics | None = None,
        keys: KeyLookup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.proxy = proxy
        self.store = store
        self.config = config
        self.metrics = metrics
        self.keys = keys
        self.clock = clock
        self.owner = f"{os.getpid()}-{new_id('')}"
        self._slots = asyncio.Semaphore(config.concurrency)
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._poll(), name="weir-batches")

    def wake(self) -> None:
        """A batch was created here: claim it now, not at the next poll."""
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """A batch this process runs was cancelled here: stop it now."""
        run = self._runs.get(batch_id)
        if run is not None:
            run.halt("cancelled")

    async def aclose(self) -> None:
        """Stop running (requests in flight are cancelled: they run again, elsewhere or
        after a restart) and give the leases back so another process may go on at once."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for batch_id in list(self._runs):
            with contextlib.suppress(Exception):
                await self.store.release(batch_id, self.owner)
        self._runs.clear()

    async def _poll(self) -> None:
        while True:
            try:
                claimed = await self.store.claim(self.owner, self.clock(), self.config.lease_s)
            except Exception:
                log.exception("could not claim batches")
                claimed = []
            for found in claimed:
                if found.batch["id"] not in self._runs:
                    self._begin(found)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)

    def _begin(self, found: Claimed) -> None:
        data = found.caller
        key = KeyRecord.from_dict(data["key"]) if data.get("key") else None
        caller = Caller(key=key, static_key=data.get("static_key"))
        run = _Run(found.batch, caller, caller.tenant, data.get("output_expires_s"))
        self._runs[run.id] = run
        task = asyncio.create_task(self._run(run), name=f"weir-batch-{run.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, run: _Run) -> None:
        if self.metrics is not None:
            self.metrics.batches.inc()
        keeper = asyncio.create_task(self._keep(run))
        try:
            if run.batch["status"] == "cancelling":
                run.halt("cancelled")
            elif self.clock() >= run.batch["expires_at"]:  # resumed after its window
                run.halt("expired")
            elif not await self._still_allowed(run):
                run.halt("failed")
            await self._send_all(run)
            await self._finish(run)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped on an error; it is tried again later", run.id)
            with contextlib.suppress(Exception):  # else its lease runs out
                await self.store.release(run.id, self.owner)
        finally:
            keeper.cancel()
            self._runs.pop(run.id, None)
            if self.metrics is not None:
                self.metrics.batches.dec()

    async def _still_allowed(self, run: _Run) -> bool:
        """The batch's key is still valid (a revoked key's batch fails)."""
        key = run.caller.key
        if key is None or self.keys is None:
            return True
        now = await self.keys(key.hash)
        if now is None or now.revoked:
            return False
        run.caller = Caller(key=now)
        return True

    async def _keep(self, run: _Run) -> None:
        """Renew the lease, and see a cancel made elsewhere or the window running out. A
        store that cannot be reached is tried again at the next renewal; once the lease
        has run out meanwhile (another process may hold the batch now) this one stops."""
        every = self.config.lease_s / 3
        held_until = self.clock() + self.config.lease_s
        while run.stop is None:
            await asyncio.sleep(every)
            now = self.clock()
            try:
                status = await self.store.renew(run.id, self.owner, now, self.config.lease_s)
            except Exception:
                log.warning("batch %s: could not renew its lease", run.id, exc_info=True)
                if self.clock() >= held_until:
                    run.halt("lost")
                continue
            held_until = now + self.config.lease_s
            if status is None:  # another process holds it now: leave it to that one
                log.warning("batch %s: lease lost; stopping here", run.id)
                run.halt("lost")
            elif status == "cancelling":
                run.halt("cancelled")
            elif self.clock() >= run.batch["expires_at"]:
                run.halt("expired")

    async def _send_all(self, run: _Run) -> None:
        """Every line without a result, page by page; then once more from the start while
        some still have none (a result the store could not take: the line runs again)."""
        while run.stop is None and await self._send_pass(run):
            pass

    async def _send_pass(self, run: _Run) -> bool:
        """One pass over the lines without a result; whether it sent any."""
        above = -1
        sent = False
        while run.stop is None:
            page = await self.store.pending(run.id, PAGE, above)
            if not page:
                break
            sent = True
            for line in page:
                await self._slots.acquire()
                if run.stop is not None:
                    self._slots.release()
                    break
                task = asyncio.create_task(self._one(run, line))
                run.tasks.add(task)
                task.add_done_callback(run.tasks.discard)
                above = line.n
        while run.tasks:
            await asyncio.gather(*list(run.tasks), return_exceptions=True)
        return sent

    async def _one(self, run: _Run, line: Line) -> None:
        try:
            endpoint = ENDPOINTS[run.batch["endpoint"]]
            delay = 0.5
            while True:
                request_id = new_id("batch_req_")
                request = endpoint.model.model_validate_json(line.body)
                call = Call(run.caller, request_id, never, priority="batch")
                try:
                    answer = await self.proxy().handle(endpoint.route, request, call)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    status, body, _ = render(exc, request_id)
                    # a money budget is not a rate: waiting only helps a day or month budget,
                    # and never a total; the line gets its 429 as its result
                    if status in RETRY and not isinstance(exc, BudgetExceeded):
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self.config.retry_max_s)
                        continue
                    result, ok = output_line(line.custom_id, request_id, status, body), False
                else:
                    if not isinstance(answer, JsonAnswer):
                        raise TypeError("a batch request was answered with a stream")
                    status = answer.status
                    ok = status < 400
                    result = output_line(line.custom_id, request_id, status, answer.body)
                if await self.store.record(run.id, line.n, result, ok):
                    self._count("completed" if ok else "failed")
                return
        finally:
            self._slots.release()

    async def _finish(self, run: _Run) -> None:
        if run.stop == "lost":
            return
        batch = run.batch
        now = int(self.clock())
        if run.stop == "failed":
            batch |= {"status": "failed", "failed_at": now, "errors": {"object": "list", "data": [
                {"code": "key_revoked", "message": "The batch's API key was revoked.",
                 "param": None, "line": None}]}}  # fmt: skip
            await self.store.finish(_present(batch), [], run.tenant)
            return
        if run.stop in ("cancelled", "expired"):
            code = f"batch_{run.stop}"
            message = f"The batch was {run.stop} before this request ran."
            while page := await self.store.pending(run.id, PAGE):
                for line in page:
                    await self.store.record(
                        run.id, line.n, unanswered_line(line.custom_id, code, message), False
                    )
                    self._count(run.stop)
        stored = await self.store.batch(None, run.id)
        if stored is not None and stored.get("cancelling_at"):
            batch["cancelling_at"] = stored["cancelling_at"]
        await self.store.save(_present(batch | {"status": "finalizing", "finalizing_at": now}))
        output, errors = await self.store.results(run.id)
        total, completed, failed = await self.store.counts(run.id)
        files: list[tuple[JSON, bytes]] = []
        for kind, content in (("output", output), ("error", errors)):
            if content:
                record = {
                    "id": new_id("file-"), "object": "file", "bytes": len(content),
                    "created_at": now, "filename": f"{run.id}_{kind}.jsonl",
                    "purpose": "batch_output", "status": "processed",
                }  # fmt: skip
                if run.output_expires_s:  # anchored at the file's creation, as OpenAI's
                    record["expires_at"] = now + run.output_expires_s
                batch[f"{kind}_file_id"] = record["id"]
                files.append((record, content))
        final = {"cancelled": "cancelled", "expired": "expired"}.get(run.stop or "", "completed")
        batch |= {
            "status": final,
            f"{final}_at": int(self.clock()),
            "finalizing_at": now,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
        }
        await self.store.finish(_present(batch), files, run.tenant)
        log.info("batch %s %s: %d of %d requests completed", run.id, final, completed, total)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.batch_requests.labels(result).inc()


def _present(batch: JSON) -> JSON:
    """The Batch object with only the fields that have a value (as the spec types them)."""
    return {k: v for k, v in batch.items() if v is not None}
