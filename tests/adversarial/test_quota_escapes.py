"""A hostile tenant's ways around its own token limits: work the engine did for it must be
charged, whichever way the request ended.

The real gateway in-process over a fake engine, with store keys and the in-process
limit store; the ASGI app is driven directly so the client can leave mid-stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Message

from serving.keys.issue import KeyCreate, create_key
from serving.limits.limiter import Limiter
from serving.settings import CacheConfig
from tests.asgi import body_then_leave, post_scope
from tests.fakes.engine import FakeEngine
from tests.unit.test_cache import ADMIN as CACHE_ADMIN
from tests.unit.test_cache import make_rig
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


# --- the embedding cache ------------------------------------------------------------------


@pytest.mark.parametrize("changed", [{"truncate_prompt_tokens": 1}, {"normalize": False}])
def test_an_embedding_asked_differently_is_not_served_from_the_cache(
    tmp_path: Path, changed: dict[str, Any]
) -> None:
    """A field that changes the vector is part of its cache key: a key sharing a cache
    namespace cannot plant a truncated (or unnormalized) vector for a text that another
    key of the namespace then gets for its plain request (nor the other way round)."""
    client, _, embed = make_rig(tmp_path, CacheConfig())
    with client:
        hostile, victim = (
            {"authorization": "Bearer " + client.post(
                "/weir/admin/keys", json={"name": n, "cache_namespace": "team"},
                headers={"authorization": f"Bearer {CACHE_ADMIN}"},
            ).json()["key"]}
            for n in ("hostile", "victim")
        )  # fmt: skip
        plain = {"model": "minilm", "input": ["a long text to embed"]}
        planted = client.post("/v1/embeddings", json=plain | changed, headers=hostile)
        assert planted.status_code == 200, planted.text
        cache = client.app.state.proxy.cache  # type: ignore[attr-defined]
        client.portal.call(cache.drain)  # type: ignore[union-attr]
        got = client.post("/v1/embeddings", json=plain, headers=victim)
        assert got.status_code == 200, got.text
        assert got.headers["x-weir-cache"] == "miss"
        assert len(embed.calls) == 2
        assert "truncate_prompt_tokens" not in embed.calls[1]
        assert "normalize" not in embed.calls[1]
        again = client.post("/v1/embeddings", json=plain, headers=victim)  # its own: a hit
        assert again.headers["x-weir-cache"] == "hit"
