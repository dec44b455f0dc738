"""The Batch API's routes: ``/v1/files`` (upload, list, get, delete, content) and
``/v1/batches`` (create, get, list, cancel), for the caller's tenant.

A file's upload is multipart (``file``, ``purpose`` and optionally ``expires_after[anchor]``
and ``expires_after[seconds]``, as the ``openai`` client sends them); its body limit is
``batches.max_file_bytes`` (``Front`` gives this path its own). The answers are OpenAI's
``OpenAIFile`` and ``Batch`` objects; errors go through the table (an upload past the
key's request limits is a 429, past its storage quota a 400: ``Batches.upload``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError

from serving.batches.service import BatchCreate, Batches, ExpiresAfter
from serving.http.deps import configured
from serving.http.front import caller_of
from serving.http.rendering import JSONBytes
from serving.http.routes.openapi_errors import errors
from serving.http.validation import invalid_request_from_errors

router = APIRouter()
FILES = "/v1/files"
ERRORS = errors(400, 401, 404, 503)
UPLOAD_ERRORS = errors(400, 401, 404, 413, 429, 503)  # 429: an upload is a request to the limits


def _service(request: Request) -> Batches:
    batches: Batches | None = getattr(request.app.state, "batches", None)
    return configured(batches, "The Batch API is off (batches.enabled = false).")


def _expires_after(anchor: str | None, seconds: str | None) -> ExpiresAfter | None:
    """The upload's ``expires_after`` form fields as one policy (a 400 naming the field)."""
    if anchor is None and seconds is None:
        return None
    try:
        return ExpiresAfter.model_validate({"anchor": anchor, "seconds": seconds})
    except ValidationError as exc:
        raise invalid_request_from_errors(
            [e | {"loc": ("expires_after", *e["loc"])} for e in exc.errors()]
        ) from None


@router.post(FILES, summary="Upload a JSONL file for the Batch API", responses=UPLOAD_ERRORS)
async def upload(
    request: Request,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    seconds: Annotated[str | None, Form(alias="expires_after[seconds]")] = None,
) -> Any:
    service = _service(request)
    expires_after = _expires_after(anchor, seconds)
    content = await file.read(service.config.max_file_bytes + 1)
    caller = caller_of(request.scope)
    record = await service.upload(caller, file.filename or "", purpose, content, expires_after)
    return JSONBytes(record)


@router.get(FILES, summary="List files", responses=ERRORS)
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> Any:
    found = await _service(request).files(caller_of(request.scope), purpose, limit, order)
    return JSONBytes(found)


@router.get(FILES + "/{file_id}", summary="Get a file's object", responses=ERRORS)
async def get_file(request: Request, file_id: str) -> Any:
    return JSONBytes(await _service(request).file(caller_of(request.scope), file_id))


@router.delete(FILES + "/{file_id}", summary="Delete a file", responses=ERRORS)
async def delete_file(request: Request, file_id: str) -> Any:
    return JSONBytes(await _service(request).delete_file(caller_of(request.scope), file_id))


@router.get(FILES + "/{file_id}/content", summary="A file's content", responses=ERRORS)
async def file_content(request: Request, file_id: str) -> Response:
    content = await _service(request).content(caller_of(request.scope), file_id)
    return Response(content, media_type="application/jsonl")


@router.post("/v1/batches", summary="Create a batch", responses=ERRORS)
async def create_batch(request: Request, spec: BatchCreate) -> Any:
    return JSONBytes(await _service(request).create(caller_of(request.scope), spec))


@router.get("/v1/batches", summary="List batches, newest first", responses=ERRORS)
async def list_batches(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> Any:
    return JSONBytes(await _service(request).list(caller_of(request.scope), limit, after))


@router.get("/v1/batches/{batch_id}", summary="Get a batch", responses=ERRORS)
async def get_batch(request: Request, batch_id: str) -> Any:
    return JSONBytes(await _service(request).get(caller_of(request.scope), batch_id))


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch", responses=ERRORS)
async def cancel_batch(request: Request, batch_id: str) -> Any:
    return JSONBytes(await _service(request).cancel(caller_of(request.scope), batch_id))
