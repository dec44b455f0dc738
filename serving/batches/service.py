"""The Batch API's use cases: files (``/v1/files``) and batches (``/v1/batches``).

Files and batches belong to the caller's tenant (another key's id is a 404). A file for
``purpose=batch`` is JSONL, at most ``batches.max_file_bytes`` and ``max_requests`` lines;
a batch reads its input file when it is created: a file with bad lines makes a ``failed``
batch with OpenAI's ``errors`` list (line numbers), a good one is stored line by line and
handed to the ``Runner``. A batch's GET shows its progress (``request_counts``) live.

Expiry as OpenAI's: an upload's ``expires_after`` (else ``batches.upload_expires_s``) and
a batch's ``output_expires_after`` (for its output and error files; else they are kept)
give the File object its ``expires_at``, ``created_at`` plus 1 hour to 30 days. From then
on the file is not found (404, as a missing one) nor listed; the ``Sweeper`` removes its
bytes.

An upload is a request: it counts against the key's request limits (``rpm``,
``max_concurrency``) as any other does, and is refused (429) past them before its body is
read: ``upload`` admits the caller first and only then calls the route's ``read``, which
parses the multipart body (in memory), holding the admission until the file is stored.
The tenant's storage quota (``batches.max_tenant_bytes``,
``max_tenant_files``; ``store.Quota``) is checked before the file is checked (a cheap
refusal) and again in the store's transaction that writes it, so that gateways sharing
the store count the same: past it, a 400 ``storage_quota_exceeded`` and nothing stored. A
batch's input lines count while it runs (creating one past the quota is refused alike);
its output files are always written and count from then on.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.batches import lines
from serving.batches.runner import KeyLookup, Runner, caller_record
from serving.batches.store import RUNNING, BatchStore, Quota
from serving.batches.sweeper import Sweeper
from serving.core.call import Caller
from serving.core.proxy import Proxy
from serving.errors import BatchNotFound, FileNotFound, InvalidRequest, PayloadTooLarge
from serving.limits.limiter import UNLIMITED_TICKET, Limiter, Ticket, Unlimited
from serving.limits.plan import plan
from serving.observe.metrics import Metrics
from serving.protocol.metadata import MAX_METADATA
from serving.protocol.metadata import bounded as bounded_metadata
from serving.settings import BatchesConfig
from serving.sql_text import UNSTORABLE

JSON = dict[str, Any]
WINDOW_S = 24 * 3600
MAX_FILENAME = 256
# what a stored filename cannot hold: control characters (NUL: PostgreSQL's text and jsonb
# take none) and lone surrogates (a multipart charset such as utf-7 decodes to them; not UTF-8)
_UNSTORABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
MIN_EXPIRY_S = 3600  # OpenAI's bounds on expires_after.seconds: an hour...
MAX_EXPIRY_S = 30 * 86_400  # ...to 30 days
FILES_LIMIT_NAME = "files"  # what an upload's admission is made under (no model's limits)
ONE_REQUEST = frozenset({"requests", "concurrency"})  # the key's checks an upload takes


class ExpiresAfter(BaseModel):
    """A file's expiration policy (``FileExpirationAfter``, ``BatchFileExpirationAfter``)."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S)


@dataclass(frozen=True, slots=True)
class Upload:
    """An upload's form as the route read it: the file's name and bytes, its purpose and
    its ``expires_after`` (validated where the form was read)."""

    filename: str
    purpose: str
    content: bytes
    expires_after: ExpiresAfter | None = None


ReadUpload = Callable[[], Awaitable[Upload]]  # reads the request's body: only once admitted


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=MAX_METADATA)
    output_expires_after: ExpiresAfter | None = None  # the output and error files'

    @field_validator("metadata")
    @classmethod
    def _storable(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        """No NUL (PostgreSQL cannot read the record back as jsonb: the expiry sweep,
        which reads every running batch's, would fail) nor lone surrogate (not UTF-8)."""
        for text in (metadata or {}).items():
            if any(UNSTORABLE.search(part) for part in text):
                raise ValueError("keys and values cannot hold NUL or a lone surrogate")
        return bounded_metadata(metadata)


class Batches:
    def __init__(
        self,
        proxy: Callable[[], Proxy],
        store: BatchStore,
        config: BatchesConfig,
        metrics: Metrics | None = None,
        keys: KeyLookup | None = None,
        clock: Callable[[], float] = time.time,
        *,
        max_line_bytes: int,
        limiter: Limiter | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.max_line_bytes = max_line_bytes  # a line is a request: gateway.max_body_bytes
        self.limiter = limiter
        self.quota = Quota(config.max_tenant_bytes, config.max_tenant_files)
        self.runner = Runner(proxy, store, config, metrics, keys, clock)
        self.sweeper = Sweeper(store, config.sweep_s, clock)

    def __repr__(self) -> str:
        return f"Batches(store={self.store!r})"

    def start(self) -> None:
        self.runner.start()
        self.sweeper.start()

    async def aclose(self) -> None:
        await self.sweeper.aclose()
        await self.runner.aclose()
        await self.store.aclose()

    # -- files ----------------------------------------------------------------------

    async def upload(self, caller: Caller, read: ReadUpload) -> JSON:
        """The caller admitted first (429 past the key's limits: nothing of the body read),
        then ``read`` reads the form; the admission is held until the file is stored."""
        ticket = await self._admit(caller)
        try:
            form = await read()
            if form.purpose != "batch":
                raise InvalidRequest(
                    "Only files for the Batch API can be uploaded (purpose 'batch').",
                    param="purpose",
                )
            if len(form.content) > self.config.max_file_bytes:
                raise PayloadTooLarge(
                    f"The file is {len(form.content)} bytes; at most "
                    f"{self.config.max_file_bytes} (batches.max_file_bytes)."
                )
            return await self._upload(caller, form)
        finally:
            ticket.finish(0)  # a request holds no tokens: this frees its concurrency slot

    async def _upload(self, caller: Caller, form: Upload) -> JSON:
        content, expires_after = form.content, form.expires_after
        usage = await self.store.usage(caller.tenant, self.clock())
        self.quota.check(usage, len(content), 1, "this file")  # before the work of checking
        problem = await asyncio.to_thread(
            lines.check_jsonl, content, self.config.max_requests, self.max_line_bytes
        )
        if problem is not None:
            raise InvalidRequest(problem, param="file")
        now = int(self.clock())
        lifetime = expires_after.seconds if expires_after else self.config.upload_expires_s
        record = {
            "id": lines.new_id("file-"), "object": "file", "bytes": len(content),
            "created_at": now, "filename": stored_filename(form.filename),
            "purpose": "batch", "status": "processed",
        }  # fmt: skip
        if lifetime:
            record["expires_at"] = now + lifetime
        await self.store.put_file(caller.tenant, record, content, self.quota)
        return record

    async def _admit(self, caller: Caller) -> Ticket | Unlimited:
        """The upload counted as one request against its key's limits (429 past them)."""
        if self.limiter is None:
            return UNLIMITED_TICKET
        checks = plan(caller.key, FILES_LIMIT_NAME, 0, None)
        wanted = [check for check in checks if check.kind in ONE_REQUEST]
        if not wanted:
            return UNLIMITED_TICKET
        return await self.limiter.admit(FILES_LIMIT_NAME, wanted)

    async def file(self, caller: Caller, file_id: str) -> JSON:
        found = await self.store.file(caller.tenant, file_id, self.clock())
        if found is None:
            raise _no_file(file_id)
        return found

    async def content(self, caller: Caller, file_id: str) -> bytes:
        found = await self.store.content(caller.tenant, file_id, self.clock())
        if found is None:
            raise _no_file(file_id)
        return found

    async def files(self, caller: Caller, purpose: str | None, limit: int, order: str) -> JSON:
        found = await self.store.files(caller.tenant, purpose, limit, order == "desc", self.clock())
        return _page(found, has_more=False)

    async def delete_file(self, caller: Caller, file_id: str) -> JSON:
        if not await self.store.delete_file(caller.tenant, file_id, self.clock()):
            raise _no_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches --------------------------------------------------------------------

    async def create(self, caller: Caller, spec: BatchCreate) -> JSON:
        tenant = caller.tenant
        read_at = self.clock()
        source = await self.store.file(tenant, spec.input_file_id, read_at)
        if source is None:
            raise _no_file(spec.input_file_id, "input_file_id")
        if source.get("purpose") != "batch":
            raise InvalidRequest(
                "The input file must be uploaded with purpose 'batch'.", param="input_file_id"
            )
        content = await self.store.content(tenant, spec.input_file_id, read_at) or b""
        found, errors = await asyncio.to_thread(
            lines.parse, content, spec.endpoint, self.config.max_requests, self.max_line_bytes
        )
        now = int(self.clock())
        batch: JSON = {
            "id": lines.new_id("batch_"), "object": "batch", "endpoint": spec.endpoint,
            "input_file_id": spec.input_file_id, "completion_window": spec.completion_window,
            "status": "in_progress", "created_at": now, "in_progress_at": now,
            "expires_at": now + WINDOW_S,
            "request_counts": {"total": len(found), "completed": 0, "failed": 0},
        }  # fmt: skip
        if spec.metadata is not None:
            batch["metadata"] = spec.metadata
        if errors:
            batch |= {"status": "failed", "failed_at": now,
                      "errors": {"object": "list", "data": errors}}  # fmt: skip
            batch.pop("in_progress_at")
            batch["request_counts"]["total"] = 0
            found = []
        private = caller_record(caller)
        if spec.output_expires_after is not None:
            private["output_expires_s"] = spec.output_expires_after.seconds
        await self.store.create_batch(tenant, batch, private, found, self.quota)
        if found:
            self.runner.wake()
        return batch

    async def get(self, caller: Caller, batch_id: str) -> JSON:
        batch = await self.store.batch(caller.tenant, batch_id)
        if batch is None:
            raise _no_batch(batch_id)
        if batch["status"] in RUNNING:  # progress, as of now
            total, completed, failed = await self.store.counts(batch_id)
            batch["request_counts"] = {"total": total, "completed": completed, "failed": failed}
        return batch

    async def list(self, caller: Caller, limit: int, after: str | None) -> JSON:
        found = await self.store.batches(caller.tenant, limit + 1, after)
        return _page(found[:limit], has_more=len(found) > limit)

    async def cancel(self, caller: Caller, batch_id: str) -> JSON:
        batch = await self.get(caller, batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] not in ("validating", "in_progress"):
            raise InvalidRequest(
                f"The batch is {batch['status']}; only a running batch can be cancelled.",
                param="batch_id",
            )
        batch |= {"status": "cancelling", "cancelling_at": int(self.clock())}
        ended = ("finalizing", "completed", "failed", "expired", "cancelled")
        if not await self.store.save(batch, unless=ended):
            return await self.get(caller, batch_id)  # it ended meanwhile: as it is
        self.runner.cancel(batch_id)
        return batch


def stored_filename(name: str) -> str:
    """An upload's name as stored and answered: what the store cannot hold made ``?``."""
    return _UNSTORABLE.sub("?", name[:MAX_FILENAME]) or "batch.jsonl"


def _page(data: list[JSON], *, has_more: bool) -> JSON:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _no_file(file_id: str, param: str | None = None) -> FileNotFound:
    return FileNotFound(f"No file with id '{file_id[:128]}'.", param=param)


def _no_batch(batch_id: str) -> BatchNotFound:
    return BatchNotFound(f"No batch with id '{batch_id[:128]}'.")


def make_batches(
    config: BatchesConfig,
    proxy: Callable[[], Proxy],
    metrics: Metrics | None = None,
    keys: KeyLookup | None = None,
    *,
    max_line_bytes: int,
    limiter: Limiter | None = None,
) -> Batches | None:
    """The Batch API with its store (PostgreSQL at ``database_url``, else the SQLite file;
    nothing opened yet); None when it is off. ``max_line_bytes``: the gateway's body limit
    (``gateway.max_body_bytes``), a line's; ``limiter``: the keys' limits, for uploads."""
    if not config.enabled:
        return None
    url = config.database_url
    store = BatchStore(url.get_secret_value() if url is not None else config.sqlite_path)
    return Batches(
        proxy, store, config, metrics, keys, max_line_bytes=max_line_bytes, limiter=limiter
    )
