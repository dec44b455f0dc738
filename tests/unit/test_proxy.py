"""The proxy as a use case, with no HTTP: a ``Call`` in, an ``Answer`` out, and everything
the request held (limit reservation, bulkhead place, replica attempt, in-flight count)
given back exactly once however it ended. Nothing here imports Starlette or FastAPI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import orjson
import pytest

from models.config import ModelConfig
from models.engines.fleet import Fleet, Replica
from models.errors import EngineFailed, EngineOverloaded
from models.registry import Registry
from models.types import ReplicaKey
from serving.core.answer import JsonAnswer, StreamAnswer
from serving.core.call import Call, Caller, never
from serving.core.proxy import CHAT, EMBEDDINGS, Proxy
from serving.errors import ClientClosed, PermissionDenied
from serving.keys.records import KeyRecord
from serving.limits.limiter import Limiter
from serving.limits.store import MemoryLimitStore
from serving.protocol.requests import ChatCompletionRequest, EmbeddingRequest
from serving.routing.dispatch import Deadlines, Dispatcher
from serving.settings import ContractConfig, Settings
from tests.fakes.engine import FakeEngine
from tests.openai_spec import validate

pytestmark = pytest.mark.anyio
HI: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
KEY = KeyRecord(hash="a" * 64, name="team", tpm=10_000)


def one_at_a_time(models: list[ModelConfig]) -> list[ModelConfig]:
    """Each version takes one request and queues none: a place not given back shows."""
    return [
        m.model_copy(update={"routing": m.routing.model_copy(update={"max_queue": 0,
                                                                     "max_in_flight": 1})})
        for m in models
    ]  # fmt: skip


class Gateway:
    """A proxy in front of fake engines, with a real in-memory limiter."""

    def __init__(self, chat: FakeEngine, embed: FakeEngine | None = None) -> None:
        models = one_at_a_time(Settings().models)
        replicas = [
            Replica(ReplicaKey("smollm2", "135m-instruct", 0), chat, "smollm2", healthy=True),
            Replica(
                ReplicaKey("minilm", "l6-v2", 0), embed or FakeEngine(), "minilm", healthy=True
            ),
        ]
        replicas[1].healthy = True
        self.dispatcher = Dispatcher(Fleet(replicas), models, Deadlines(5.0, 10.0))
        self.limiter = Limiter(MemoryLimitStore())
        self.proxy = Proxy(
            Registry(models), self.dispatcher, {}, ContractConfig(), self.limiter,
            log_requests=False,
        )  # fmt: skip

    async def held(self) -> tuple[int, int]:
        """Reservations still open in the limiter, requests still counted in flight."""
        await self.limiter.drain()
        outstanding = await self.limiter.store.outstanding()
        return outstanding.reservations, sum(self.proxy.tracker.inflight.values())


def call(caller: Caller | None = None, disconnected: Any = never) -> Call:
    return Call(caller or Caller(key=KEY), "req-1", disconnected)


async def chunks(answer: StreamAnswer) -> list[bytes]:
    return [event async for event in answer.events]


async def test_a_chat_answer_is_json_and_gives_everything_back() -> None:
    gateway = Gateway(FakeEngine())
    for _ in range(2):  # the second is admitted: the bulkhead's one place came back
        answer = await gateway.proxy.handle(CHAT, ChatCompletionRequest(**HI), call())
        assert isinstance(answer, JsonAnswer)
        validate("CreateChatCompletionResponse", answer.body)
        assert answer.body["model"] == "smollm2"
        assert answer.headers["x-weir-model-version"] == "135m-instruct"
        assert "x-ratelimit-remaining-tokens" in answer.headers
    assert await gateway.held() == (0, 0)


async def test_a_stream_holds_its_place_until_it_ends() -> None:
    gateway = Gateway(FakeEngine())
    request = ChatCompletionRequest(**HI | {"stream": True})
    answer = await gateway.proxy.handle(CHAT, request, call())
    assert isinstance(answer, StreamAnswer)
    assert answer.headers["cache-control"] == "no-cache"
    with pytest.raises(EngineOverloaded):  # one place, and the open stream holds it
        await gateway.proxy.handle(CHAT, ChatCompletionRequest(**HI), call())
    events = await chunks(answer)
    assert events[-1] == b"data: [DONE]\n\n"
    for event in events[:-1]:
        validate("CreateChatCompletionStreamResponse", orjson.loads(event[len(b"data: ") :]))
    assert answer.on_close is not None
    await answer.on_close()  # what the edge calls last; the stream already ended its lease
    assert await gateway.held() == (0, 0)
    again = await gateway.proxy.handle(CHAT, ChatCompletionRequest(**HI), call())
    assert isinstance(again, JsonAnswer)


async def test_a_stream_nobody_reads_is_released_when_the_edge_closes_it() -> None:
    engine = FakeEngine()
    gateway = Gateway(engine)
    answer = await gateway.proxy.handle(
        CHAT, ChatCompletionRequest(**HI | {"stream": True}), call()
    )
    assert isinstance(answer, StreamAnswer)
    assert answer.on_close is not None
    await answer.events.aclose()  # the client left before reading
    await answer.on_close()
    assert engine.closed_streams == 1  # the engine connection is dropped (vLLM aborts)
    assert await gateway.held() == (0, 0)


async def test_a_client_that_leaves_cancels_the_engine_call_and_frees_its_place() -> None:
    engine = FakeEngine(hang_s=5.0)
    gateway = Gateway(engine)
    left = asyncio.Event()

    async def disconnected() -> None:
        await left.wait()

    pending = asyncio.ensure_future(
        gateway.proxy.handle(CHAT, ChatCompletionRequest(**HI), call(disconnected=disconnected))
    )
    for _ in range(1000):  # polled: the call has reached the engine (it hangs there)
        if engine.calls:
            break
        await asyncio.sleep(0.01)
    assert len(engine.calls) == 1
    left.set()
    with pytest.raises(ClientClosed):
        await pending
    assert engine.cancelled == 1
    assert await gateway.held() == (0, 0)


async def test_an_engine_failure_is_raised_and_releases_everything() -> None:
    gateway = Gateway(FakeEngine(fail_with=EngineFailed("boom")))
    with pytest.raises(EngineFailed):
        await gateway.proxy.handle(CHAT, ChatCompletionRequest(**HI), call())
    assert await gateway.held() == (0, 0)


async def test_a_key_without_the_model_is_refused_before_anything_is_held() -> None:
    engine = FakeEngine()
    gateway = Gateway(engine)
    narrow = Caller(key=KeyRecord(hash="b" * 64, name="narrow", models=("minilm",)))
    with pytest.raises(PermissionDenied):
        await gateway.proxy.handle(CHAT, ChatCompletionRequest(**HI), call(narrow))
    assert engine.calls == []
    assert await gateway.held() == (0, 0)


async def test_embeddings_answer_with_vectors() -> None:
    gateway = Gateway(FakeEngine(), FakeEngine(name="embed"))
    request = EmbeddingRequest(model="minilm", input=["a", "b"])
    answer = await gateway.proxy.handle(EMBEDDINGS, request, call())
    assert isinstance(answer, JsonAnswer)
    validate("CreateEmbeddingResponse", answer.body)
    assert [d["index"] for d in answer.body["data"]] == [0, 1]
    assert await gateway.held() == (0, 0)


def test_the_core_imports_nothing_of_starlette_or_fastapi() -> None:
    """The use cases are HTTP-free: importing them loads no web framework."""
    code = (
        "import sys; import serving.core.proxy, serving.core.lease, serving.routing.dispatch;"
        " print(sorted({m.split('.')[0] for m in sys.modules} & {'starlette', 'fastapi'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
