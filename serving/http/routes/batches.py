"""The Batch API's routes: ``/v1/files`` (upload, list, get, delete, content) and
``/v1/batches`` (create, get, list, cancel), for the caller's tenant.

A file's upload is multipart (``file``, ``purpose`` and optionally ``expires_after[anchor]``
and ``expires_after[seconds]``, as the ``openai`` client sends them); its body limit is
``batches.max_file_bytes`` plus ``FORM_BYTES`` for the form around it (``Front`` gives this
path its own). The route takes no form parameters (FastAPI would read them, spooling the
file to disk, before the key's limits are checked): ``Batches.upload`` admits the caller,
then calls the route's reader, which parses the body in memory (``serving.http.multipart``);
the operation's ``openapi_extra`` documents the form. The answers are OpenAI's
``OpenAIFile`` and ``Batch`` objects; errors go through the table (an upload past the key's
request limits is a 429, past its storage quota a 400: ``Batches.upload``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from serving.batches.service import (
    MAX_EXPIRY_S,
    MIN_EXPIRY_S,
    BatchCreate,
    Batches,
    ExpiresAfter,
    Upload,
)
from serving.errors import InvalidRequest
from serving.http.deps import configured
from serving.http.front import caller_of
from serving.http.multipart import read_form
from serving.http.rendering import JSONBytes
from serving.http.routes.openapi_errors import errors
from serving.http.validation import invalid_request_from_errors

router = APIRouter()
FILES = "/v1/files"
ERRORS = errors(400, 401, 404, 503)
UPLOAD_ERRORS = errors(400, 401, 404, 413, 429, 503)  # 429: an upload is a request to the limits
FORM_BYTES = 2**16  # an upload's body past its file: the form's parts and boundaries
ANCHOR, SECONDS = "expires_after[anchor]", "expires_after[seconds]"
MAX_FORM_FIELDS = 8  # purpose and expires_after's two, a few to spare
_FORM: dict[str, Any] = {  # the form, as FastAPI described it from File() and Form()
    "type": "object",
    "title": "FileUpload",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "title": "File", "description": "The JSONL input file."},
        "purpose": {"type": "string", "enum": ["batch"], "title": "Purpose"},
        ANCHOR: {"type": "string", "enum": ["created_at"], "title": "Expires After[Anchor]"},
        SECONDS: {"type": "integer", "minimum": MIN_EXPIRY_S, "maximum": MAX_EXPIRY_S,
                  "title": "Expires After[Seconds]"},
    },
}  # fmt: skip
UPLOAD_BODY = {"requestBody": {"required": True,
                               "content": {"multipart/form-data": {"schema": _FORM}}}}  # fmt: skip


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


async def _read_upload(request: Request, max_file_bytes: int) -> Upload:
    """The upload's form, read in memory (a 400 naming the field it lacks)."""
    form = await read_form(request, max_bytes=max_file_bytes + FORM_BYTES, max_files=1,
                           max_fields=MAX_FORM_FIELDS, param="file")  # fmt: skip
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            missing = "Field required" if file is None else "a file is required, not a field"
            raise InvalidRequest(f"file: {missing}", param="file")
        purpose = _field(form, "purpose")
        if purpose is None:
            raise InvalidRequest("purpose: Field required", param="purpose")
        expires_after = _expires_after(_field(form, ANCHOR), _field(form, SECONDS))
        content = await file.read()
    finally:
        await form.close()
    return Upload(file.filename or "", purpose, content, expires_after)


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)  # the one file the form may hold is "file": a field is a str
    return value if isinstance(value, str) else None


@router.post(
    FILES,
    summary="Upload a JSONL file for the Batch API",
    responses=UPLOAD_ERRORS,
    openapi_extra=UPLOAD_BODY,
)
async def upload(request: Request) -> Any:
    service = _service(request)
    limit = service.config.max_file_bytes
    record = await service.upload(caller_of(request.scope), lambda: _read_upload(request, limit))
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
