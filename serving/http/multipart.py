"""A ``multipart/form-data`` body read in memory, within bounds, with Starlette's parser.

FastAPI reads ``File()``/``Form()`` parameters before the endpoint runs, and Starlette's
parser spools a file part over 1 MiB to a temporary file on disk: a route that takes an
upload reads its body itself instead, once the request has been admitted, with this.

The body is counted as it is read (413 past ``max_bytes``, as ``Front``'s limit), so a
file part, never larger than the body, is never spooled to disk (``spool_max_size``
above it). A body that is not multipart, a malformed one, or one with more files or
fields than asked for is a 400 naming ``param``. A client that leaves before the body
is read (or that ``Front`` cut off past its limit, answering 413) is ``ClientClosed`` (a
client gone, logged at INFO): not an unhandled error, a 500 and its traceback.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from serving.errors import ClientClosed, InvalidRequest, PayloadTooLarge

MAX_FIELD_BYTES = 1024  # a form field that is not a file (a name, a number)


async def read_form(
    request: Request, *, max_bytes: int, max_files: int, max_fields: int, param: str
) -> FormData:
    """The request's multipart form, its files in memory (the caller closes it)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise InvalidRequest("The request body must be multipart/form-data.", param=param)
    parser = MultiPartParser(
        request.headers,
        _bounded(request.stream(), max_bytes),
        max_files=max_files,
        max_fields=max_fields,
        max_part_size=MAX_FIELD_BYTES,
    )
    parser.spool_max_size = max_bytes + 1  # a part is never larger than the body: in memory
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"The multipart body is invalid: {exc.message}", param=param) from None
    except ClientDisconnect:
        raise ClientClosed("The client closed the connection while sending the body.") from None


async def _bounded(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes.")
        yield chunk
