"""A hostile tenant's ways around its own token limits: work the engine did for it must be
charged, whichever way the request ended.

The real gateway in-process over a fake engine, with store keys and the in-process
limit store; the ASGI app is driven directly so the client can leave mid-stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.types import Message

from serving.keys.issue import KeyCreate, create_key
from serving.limits.limiter import Limiter
from tests.asgi import body_then_leave, post_scope
from tests.fakes.engine import FakeEngine
from tests.unit.test_limits_gateway import CHAT, make_app

pytestmark = pytest.mark.anyio
WORDS = 40


async def test_a_stream_left_before_its_usage_chunk_is_charged_what_it_was_sent(
    tmp_path: Path,
) -> None:
    """Every content chunk delivered, then the client leaves before the usage chunk: the
    tokens it got count toward its tpm, as they do toward its money budget (README)."""
    engine = FakeEngine(words=["word "] * WORDS, hold_before_done=asyncio.Event())  # never set
    app = make_app(engine, tmp_path)
    raw = orjson.dumps(CHAT | {"stream": True, "max_tokens": 100})
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async with app.router.lifespan_context(app):
        secret, _ = await create_key(app.state.key_store, KeyCreate(name="h", tpm=1000))
        auth = [(b"authorization", f"Bearer {secret}".encode())]
        receive = body_then_leave(raw, lambda: asyncio.sleep(0.3))
        scope = post_scope("/v1/chat/completions", raw, auth)
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
        limiter: Limiter = app.state.limiter
        await limiter.drain()
        bodies = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert bodies.count(b"word") == WORDS  # the whole answer was delivered
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            after = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {secret}"}
            )
    assert after.status_code == 200, after.text
    # this request's 20 reserved, and at least the 40 tokens the left stream was sent
    assert int(after.headers["x-ratelimit-remaining-tokens"]) <= 1000 - 20 - WORDS
