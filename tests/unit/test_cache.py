"""The response and embedding caches at the gateway (fake engine; memory and real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.types import Message

from models.config import ModelConfig, VersionConfig
from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed
from models.types import ReplicaKey
from serving.cache.entries import Assembler
from serving.cache.store import MemoryCacheStore
from serving.http.app import create_app
from serving.settings import CacheConfig, KeysConfig, Settings
from tests.asgi import body_then_leave, post_scope
from tests.fakes.engine import FakeEngine, embedding_of
from tests.openai_spec import validate
from tests.redis_server import dead_port
from tests.unit.test_observe import sample
from tests.windows import hold_limit_window

ADMIN = "admin-for-cache-tests"
CHAT: dict[str, Any] = {
    "model": "smollm2",
    "messages": [{"role": "user", "content": "Capital of France?"}],
    "temperature": 0,
    "max_tokens": 20,
}


class Rig:
    def __init__(self, client: TestClient, chat: FakeEngine, embed: FakeEngine) -> None:
        self.client = client
        self.chat = chat
        self.embed = embed

    def key(self, **fields: Any) -> dict[str, str]:
        made = self.client.post(
            "/weir/admin/keys", json={"name": "c", **fields},
            headers={"authorization": f"Bearer {ADMIN}"},
        ).json()  # fmt: skip
        return {"authorization": f"Bearer {made['key']}"}

    def drain(self) -> None:
        cache = self.client.app.state.proxy.cache  # type: ignore[attr-defined]
        self.client.portal.call(cache.drain)  # type: ignore[union-attr]


def make_rig(tmp_path: Path, cache: CacheConfig) -> tuple[TestClient, FakeEngine, FakeEngine]:
    chat, embed = FakeEngine(), FakeEngine(name="embed")

    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2"),
                Replica(ReplicaKey("minilm", "l6-v2", 0), embed, "minilm"),
            ],
            health_interval_s=0.05,
        )

    keys = KeysConfig(enabled=True, file=tmp_path / "keys.json", admin_key=SecretStr(ADMIN))
    app = create_app(Settings(keys=keys, cache=cache), fleet_factory=fleet, counters={})
    return TestClient(app, raise_server_exceptions=False), chat, embed


@pytest.fixture(params=["memory", "redis"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Rig]:
    if request.param == "redis":
        redis.Redis.from_url(redis_url).flushdb()
        config = CacheConfig(redis_url=redis_url)
    else:
        config = CacheConfig()
    client, chat, embed = make_rig(tmp_path, config)
    with client:
        hold_limit_window(client.app)  # token headers read across requests: one minute
        yield Rig(client, chat, embed)


def post(rig: Rig, body: dict[str, Any], auth: dict[str, str], **headers: str) -> Any:
    answer = rig.client.post("/v1/chat/completions", json=body, headers=auth | headers)
    rig.drain()
    return answer


def test_second_identical_deterministic_request_is_a_hit(rig: Rig) -> None:
    auth = rig.key(tpm=10_000)
    first = post(rig, CHAT, auth)
    second = post(rig, CHAT, auth)
    assert (first.headers["x-weir-cache"], second.headers["x-weir-cache"]) == ("miss", "hit")
    assert len(rig.chat.calls) == 1  # the hit never reached the engine
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]  # usage still reported
    validate("CreateChatCompletionResponse", second.json())
    # the hit charged no tokens: after it, only the first request's 8 are gone (the next
    # request's own reservation of 20 shows in its header)
    after = post(rig, CHAT | {"temperature": 0.5}, auth)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 8 - 20)
    seeded = CHAT | {"temperature": 0.9, "seed": 7}
    assert [post(rig, seeded, auth).headers["x-weir-cache"] for _ in range(2)] == ["miss", "hit"]


def test_only_deterministic_requests_and_controls(rig: Rig) -> None:
    auth = rig.key()
    sampled = CHAT | {"temperature": 0.7}
    assert [post(rig, sampled, auth).headers["x-weir-cache"] for _ in range(2)] == ["bypass"] * 2
    assert post(rig, CHAT, auth).headers["x-weir-cache"] == "miss"
    assert (
        post(rig, CHAT, auth, **{"x-weir-cache-control": "bypass"}).headers["x-weir-cache"]
        == "bypass"
    )
    assert (
        post(rig, CHAT, auth, **{"x-weir-cache-control": "refresh"}).headers["x-weir-cache"]
        == "miss"
    )
    by_field = CHAT | {"weir": {"cache": "bypass"}}
    assert post(rig, by_field, auth).headers["x-weir-cache"] == "bypass"
    assert "weir" not in rig.chat.calls[-1]  # the extension never reaches the engine
    assert len(rig.chat.calls) == 6  # 2 sampled, 1 miss, bypass, refresh, bypass by field
    assert post(rig, CHAT, auth).headers["x-weir-cache"] == "hit"  # what refresh stored
    off = rig.key(cache=False)
    assert "x-weir-cache" not in post(rig, CHAT, off).headers
    assert len(rig.chat.calls) == 7


def test_tenants_never_share_unless_they_share_a_namespace(rig: Rig) -> None:
    a, b = rig.key(), rig.key()
    team1, team2 = rig.key(cache_namespace="team"), rig.key(cache_namespace="team")
    results = [post(rig, CHAT, auth).headers["x-weir-cache"] for auth in (a, b, a, b)]
    assert results == ["miss", "miss", "hit", "hit"]
    assert [post(rig, CHAT, auth).headers["x-weir-cache"] for auth in (team1, team2)] == [
        "miss",
        "hit",
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 21}, {"top_p": 0.5}, {"stop": ["x"]}, {"seed": 1},
        {"presence_penalty": 0.1}, {"frequency_penalty": 0.1},
        {"logit_bias": {"50256": -100}}, {"response_format": {"type": "text"}},
        {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]},
        {"model": "smollm2@135m-instruct", "messages": [{"role": "user", "content": "Other"}]},
        {"top_k": 5}, {"min_tokens": 2}, {"repetition_penalty": 1.1},
    ],
)  # fmt: skip
def test_any_generation_parameter_changes_the_entry(rig: Rig, change: dict[str, Any]) -> None:
    auth = rig.key()
    assert post(rig, CHAT, auth).headers["x-weir-cache"] == "miss"
    assert post(rig, CHAT | change, auth).headers["x-weir-cache"] == "miss"
    # naming the version explicitly is the same version: same entry
    pinned = CHAT | {"model": "smollm2@135m-instruct"}
    assert post(rig, pinned, auth).headers["x-weir-cache"] == "hit"


def test_n_changes_the_entry(rig: Rig) -> None:
    """n > 1 is refused at temperature 0 (greedy sampling gives one answer): a seeded,
    sampled request is the cached one that n can change."""
    auth = rig.key()
    seeded = CHAT | {"temperature": 0.9, "seed": 7}
    assert post(rig, seeded, auth).headers["x-weir-cache"] == "miss"
    assert post(rig, seeded | {"n": 2}, auth).headers["x-weir-cache"] == "miss"
    assert post(rig, seeded, auth).headers["x-weir-cache"] == "hit"


def stream(rig: Rig, body: dict[str, Any], auth: dict[str, str]) -> tuple[Any, list[Any]]:
    answer = rig.client.post("/v1/chat/completions", json=body | {"stream": True}, headers=auth)
    rig.drain()
    lines = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    return answer, lines


def test_streams_are_stored_and_replayed(rig: Rig) -> None:
    auth = rig.key()
    miss, _lines = stream(rig, CHAT, auth)
    assert miss.headers["x-weir-cache"] == "miss"
    hit, replayed = stream(rig, CHAT | {"stream_options": {"include_usage": True}}, auth)
    assert hit.headers["x-weir-cache"] == "hit"
    assert replayed[-1] == "[DONE]"
    chunks = [orjson.loads(x) for x in replayed[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello there!"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    plain = post(rig, CHAT, auth)  # a stream's entry serves a plain request too
    assert plain.headers["x-weir-cache"] == "hit"
    assert plain.json()["choices"][0]["message"]["content"] == "Hello there!"
    assert len(rig.chat.calls) == 1


def test_broken_and_failed_answers_are_never_stored(rig: Rig) -> None:
    auth = rig.key()
    rig.chat.die_after = 1
    broken, _lines = stream(rig, CHAT, auth)
    assert "engine_error" in broken.text
    rig.chat.die_after = None
    rig.chat.fail_with = EngineFailed("boom")
    assert post(rig, CHAT, auth).status_code == 502
    rig.chat.fail_with = None
    assert post(rig, CHAT, auth).headers["x-weir-cache"] == "miss"


SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "city", "schema": {"type": "object", "required": ["city"]}},
}


def test_a_streamed_answer_that_breaks_its_schema_is_never_stored(rig: Rig) -> None:
    """Issue 29: the stream was stored unchecked, and the same request sent plain was then a
    200 hit with output that breaks the schema (a miss is a 502)."""
    auth = rig.key()
    rig.chat.words = ["not", " json"]
    asked = CHAT | {"response_format": SCHEMA_FORMAT}
    streamed, _lines = stream(rig, asked, auth)
    assert streamed.headers["x-weir-cache"] == "miss"
    plain = post(rig, asked, auth)
    assert plain.headers.get("x-weir-cache") != "hit"
    assert plain.status_code == 502
    assert plain.json()["error"]["code"] == "invalid_model_output"
    rig.chat.words = ['{"city": ', '"Paris"}']  # a conforming stream is stored
    stream(rig, asked, auth)
    again = post(rig, asked, auth)
    assert (again.status_code, again.headers["x-weir-cache"]) == (200, "hit")
    assert again.headers["x-weir-output-valid"] == "true"


def test_a_structured_answer_cut_off_by_max_tokens_is_never_stored(rig: Rig) -> None:
    """It is passed on unchecked (200, finish_reason "length", as OpenAI does), so it is
    not stored: a hit says x-weir-output-valid: true, which was never checked."""
    auth = rig.key()
    rig.chat.words, rig.chat.finish_reason = ['{"city": ', '"Par'], "length"
    asked = CHAT | {"response_format": SCHEMA_FORMAT}
    first = post(rig, asked, auth)
    assert (first.status_code, first.headers["x-weir-cache"]) == (200, "miss")
    assert first.json()["choices"][0]["finish_reason"] == "length"
    streamed, _lines = stream(rig, asked, auth)
    assert streamed.headers["x-weir-cache"] == "miss"
    again = post(rig, asked, auth)
    assert (again.status_code, again.headers["x-weir-cache"]) == (200, "miss")
    assert len(rig.chat.calls) == 3


def test_a_fallback_answer_is_never_stored(tmp_path: Path) -> None:
    """Another version's answer, stored under the key of the version asked for, would
    later be served as that version's (issue 29: no test covered it)."""
    primary, fallback = FakeEngine(name="v1", words=["from v1"]), FakeEngine(name="v2")
    chat = ModelConfig(
        name="smollm2", task="chat", current="v1", fallbacks=["smollm2@v2"],
        versions=[VersionConfig(version="v1", url="x"), VersionConfig(version="v2", url="y")],
    )  # fmt: skip

    def fleet(_: object) -> Fleet:
        return Fleet(
            [
                Replica(ReplicaKey("smollm2", "v1", 0), primary, "smollm2"),
                Replica(ReplicaKey("smollm2", "v2", 0), fallback, "smollm2"),
            ],
            health_interval_s=0.05,
        )

    app = create_app(Settings(models=[chat], cache=CacheConfig()), fleet_factory=fleet,
                     counters={})  # fmt: skip
    with TestClient(app) as client:
        drain = client.app.state.proxy.cache.drain  # type: ignore[attr-defined]

        def ask(n: int) -> Any:
            asked = CHAT | {"messages": [{"role": "user", "content": f"Question {n}?"}]}
            answer = client.post("/v1/chat/completions", json=asked)
            client.portal.call(drain)  # type: ignore[union-attr]
            return answer

        primary.healthy = False  # each try asks something new: a stored answer would hide
        n = poll(ask, lambda a: "x-weir-fallback" in a.headers)  # what happens next
        moved = ask(n)
        assert moved.headers["x-weir-fallback"] == "smollm2@v2"
        assert moved.headers["x-weir-cache"] == "miss"
        assert moved.json()["choices"][0]["message"]["content"] == "Hello there!"
        primary.healthy = True
        poll(ask, lambda a: "x-weir-fallback" not in a.headers)
        calls = len(primary.calls)
        back = ask(n)  # what the fallback answered, asked again of v1
        assert back.headers["x-weir-model-version"] == "v1"
        assert back.headers["x-weir-cache"] == "miss"  # the fallback's answer was not stored
        assert back.json()["choices"][0]["message"]["content"] == "from v1"
        assert len(primary.calls) == calls + 1
        again = ask(n)  # v1's own answer is stored
        assert (again.headers["x-weir-cache"], len(primary.calls)) == ("hit", calls + 1)


_asked = iter(range(1_000_000))


def poll(ask: Any, until: Any, timeout_s: float = 10) -> int:
    """Ask new questions until an answer satisfies ``until`` (the fleet's health round has
    run); the question that did, asked again, would be a hit if it was stored."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = next(_asked)
        if until(ask(n)):
            return n + 1_000_000  # a question of its own, not yet asked
        time.sleep(0.02)
    raise AssertionError("the fleet's health round never changed the route")


def test_an_answer_over_max_entry_bytes_is_never_stored(tmp_path: Path) -> None:
    client, chat, embed = make_rig(tmp_path, CacheConfig(max_entry_bytes=2048))
    with client:
        rig = Rig(client, chat, embed)
        auth = rig.key()
        chat.content = "x" * 4096  # the entry is over 2048 bytes
        big = [post(rig, CHAT, auth).headers["x-weir-cache"] for _ in range(2)]
        assert big == ["miss", "miss"]
        assert len(chat.calls) == 2
        chat.content = None  # a small answer under the same bound is stored
        small = CHAT | {"max_tokens": 21}
        assert [post(rig, small, auth).headers["x-weir-cache"] for _ in range(2)] == [
            "miss",
            "hit",
        ]
        assert len(chat.calls) == 3


@pytest.mark.anyio
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_stream_the_client_left_is_never_stored(store: str, redis_url: str) -> None:
    """The client leaves after the chunk with finish_reason (the whole answer is in the
    assembler) but before the usage chunk and [DONE]: still never stored."""
    if store == "redis":
        redis.Redis.from_url(redis_url).flushdb()
    config = CacheConfig(redis_url=redis_url if store == "redis" else None)
    held = asyncio.Event()
    engine = FakeEngine(hold_before_done=held)

    def fleet(_: object) -> Fleet:
        replica = Replica(ReplicaKey("smollm2", "135m-instruct", 0), engine, "smollm2")
        return Fleet([replica], health_interval_s=0.05)

    app = create_app(Settings(cache=config), fleet_factory=fleet, counters={})
    raw = orjson.dumps(CHAT | {"stream": True})
    finished = asyncio.Event()  # the client has the chunk with finish_reason
    bodies: list[bytes] = []

    async def send(message: Message) -> None:
        bodies.append(message.get("body", b""))
        if b'"finish_reason":"stop"' in bodies[-1]:
            finished.set()

    async with app.router.lifespan_context(app):
        receive = body_then_leave(raw, finished.wait)
        await asyncio.wait_for(app(post_scope("/v1/chat/completions", raw), receive, send), 10)
        assert b"[DONE]" not in b"".join(bodies)  # it left before the end of the stream
        assert engine.closed_streams == 1
        await app.state.proxy.cache.drain()
        engine.hold_before_done = None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            again = await client.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 200
    assert again.headers["x-weir-cache"] == "miss"
    assert len(engine.calls) == 2


def test_a_streamed_completion_is_replayed_as_a_completion(rig: Rig) -> None:
    """Issue 29: the stored shape came from the engine's ``object`` field, not the route."""
    auth = rig.key()
    asked = {"model": "smollm2", "prompt": "Capital of France?", "temperature": 0}
    first = rig.client.post("/v1/completions", json=asked | {"stream": True}, headers=auth)
    rig.drain()
    assert first.headers["x-weir-cache"] == "miss"
    hit = rig.client.post("/v1/completions", json=asked, headers=auth)
    assert hit.headers["x-weir-cache"] == "hit"
    validate("CreateCompletionResponse", hit.json())
    assert hit.json()["choices"][0]["text"] == "Hello there!"


def test_the_assembler_builds_the_routes_shape_whatever_the_chunks_say() -> None:
    chat_chunk = {
        "object": "chat.completion.chunk",
        "id": "x",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
    }
    text = Assembler(chat=False)
    text.add(chat_chunk)
    entry = text.entry()
    assert entry is not None
    assert entry["object"] == "text_completion"
    assert entry["choices"][0]["text"] == "hi"
    chat = Assembler(chat=True)
    chat.add(chat_chunk | {"object": "text_completion"})
    made = chat.entry()
    assert made is not None
    assert made["object"] == "chat.completion"
    assert made["choices"][0]["message"]["content"] == "hi"


def test_cache_down_never_fails_a_request(tmp_path: Path) -> None:
    with dead_port() as port:
        answered = cache_down_answers(tmp_path, port)
    # each chat request: its lookup and its store (drained) failed, and were counted
    assert sample(answered, "weir_cache_requests_total", kind="response", result="error") == 6


def cache_down_answers(tmp_path: Path, port: int) -> str:
    dead = CacheConfig(redis_url=f"redis://127.0.0.1:{port}/0", timeout_s=0.1)
    client, chat, embed = make_rig(tmp_path, dead)
    with client:
        rig = Rig(client, chat, embed)
        auth = rig.key()
        answers = [post(rig, CHAT, auth) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.headers["x-weir-cache"] for a in answers] == ["miss"] * 3
        embedded = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "bb"]},
                               headers=auth)  # fmt: skip
        assert embedded.status_code == 200
        text: str = client.get("/metrics").text
    return text


def test_embeddings_send_only_misses_and_keep_order(rig: Rig) -> None:
    auth = rig.key()
    texts = [("x" * n) for n in range(1, 65)]
    half = texts[::2]
    first = rig.client.post("/v1/embeddings", json={"model": "minilm", "input": half}, headers=auth)
    rig.drain()
    assert first.headers["x-weir-cache"] == "miss"
    answer = rig.client.post(
        "/v1/embeddings", json={"model": "minilm", "input": texts}, headers=auth
    )
    rig.drain()
    assert answer.headers["x-weir-cache"] == "partial"
    assert answer.headers["x-weir-cache-hits"] == "32/64"
    assert rig.embed.calls[-1]["input"] == texts[1::2]  # only the misses went to the engine
    vectors = [d["embedding"] for d in answer.json()["data"]]
    assert vectors == [embedding_of(t) for t in texts]
    assert [d["index"] for d in answer.json()["data"]] == list(range(64))
    validate("CreateEmbeddingResponse", answer.json())
    again = rig.client.post(
        "/v1/embeddings", json={"model": "minilm", "input": texts}, headers=auth
    )
    assert again.headers["x-weir-cache"] == "hit"
    assert len(rig.embed.calls) == 2


def test_embedding_cache_is_scoped_per_tenant(rig: Rig) -> None:
    """Tenant B never hits (nor learns, from x-weir-cache-hits) what tenant A embedded."""
    a, b = rig.key(), rig.key()
    texts = ["the text only tenant a embedded", "another of a's"]
    body = {"model": "minilm", "input": texts}
    first = rig.client.post("/v1/embeddings", json=body, headers=a)
    rig.drain()
    assert first.headers["x-weir-cache-hits"] == "0/2"
    other = rig.client.post("/v1/embeddings", json=body, headers=b)
    rig.drain()
    assert other.status_code == 200
    assert other.headers["x-weir-cache-hits"] == "0/2"
    assert other.headers["x-weir-cache"] == "miss"
    assert rig.embed.calls[-1]["input"] == texts  # b's texts went to the engine
    assert [d["embedding"] for d in other.json()["data"]] == [embedding_of(t) for t in texts]
    again = rig.client.post("/v1/embeddings", json=body, headers=a)
    assert again.headers["x-weir-cache-hits"] == "2/2"  # a's own entries still serve a
    assert len(rig.embed.calls) == 2


def test_memory_store_is_bounded_lru() -> None:
    import asyncio

    store = MemoryCacheStore(max_bytes=100)

    async def run() -> list[bytes | None]:
        await store.set_many([("a", b"x" * 40), ("b", b"y" * 40)], 60)
        await store.get_many(["a"])  # a is now the most recent
        await store.set_many([("c", b"z" * 40)], 60)  # over 100 bytes: b goes
        return await store.get_many(["a", "b", "c"])

    assert asyncio.run(run()) == [b"x" * 40, None, b"z" * 40]
    assert store.size_bytes == 80
