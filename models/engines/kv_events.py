"""vLLM's KV cache events, engine side: where an engine publishes them, the flag that makes
it do so, and the block hashes its events name.

An engine started with ``--kv-events-config`` publishes, over ZeroMQ, a batch of
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events per scheduler step
(``vllm/distributed/kv_events.py``): multipart ``(topic, seq as 8 bytes big-endian,
msgpack payload)`` on a PUB socket, and the batches it still keeps on a ROUTER socket to
anyone who sends a starting sequence number (then an end marker, seq -1).

Local engines publish on ``ipc://`` sockets in a directory only this process's user can
enter (vLLM binds ipc endpoints; a ``tcp://`` one it binds only with a ``*`` host, on every
interface). Remote engines name their ports in the version's config
(``kv_events_port``, ``kv_replay_port``) and are reached at their URL's host.

A block's hash is vLLM's ``hash_block_tokens``: ``H((parent, tuple(tokens), extra))``,
chained from ``NONE_HASH = H(seed)`` over full blocks only, where ``H`` is the engine's
``--prefix-caching-hash-algo`` (``sha256``: SHA-256 of the pickle; ``sha256_cbor``: of
canonical CBOR) and the seed its ``PYTHONHASHSEED``, else ``"vllm-none-hash"``. Events
carry the hash as its low 64 bits (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, on by
default) or as the digest; both are kept here as the low 64 bits (``external``).

``extra`` is None for a plain text prompt, else the tuple vLLM 0.32's
``generate_block_hash_extra_keys`` makes (in its order: LoRA, multimodal, salt, prompt
embeddings): a LoRA request's ``("lora", name, path)`` on every block (the name and path
the adapter was loaded with), a request's ``cache_salt`` as ``("cache_salt", salt)`` on
the first block only. Multimodal inputs and prompt embeddings are not hashed here: from
the first block that holds one on, the chain differs from the engine's and matches
nothing (a missed hit, never a false one).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from models.config import ModelConfig, VersionConfig
from models.errors import ConfigError
from models.types import ReplicaKey

DEFAULT_SEED = "vllm-none-hash"  # vLLM's seed for cryptographic hashes without PYTHONHASHSEED
HASH_ALGOS = ("sha256", "sha256_cbor")  # xxhash ones seed NONE_HASH at random per process
DEFAULT_BLOCK_SIZE = {"cpu": 128, "cuda": 16}  # vLLM's defaults by platform (0.32)
LOW64 = (1 << 64) - 1


@dataclass(frozen=True)
class EventEndpoints:
    """Where one engine publishes: its PUB socket, and its replay ROUTER (or none)."""

    publisher: str
    replay: str | None = None


def wanted(model: ModelConfig) -> bool:
    """Whether ``model``'s engines publish KV events (its routing reads them)."""
    return model.routing.strategy == "kv_aware"


@functools.cache
def _run_dir() -> str:
    """A private directory for this process's engines' sockets (made on first use)."""
    return tempfile.mkdtemp(prefix="weir-kv-")  # mode 0700


def local_endpoints(key: ReplicaKey) -> EventEndpoints:
    """The ipc sockets of the local engine ``key`` (the same for every start of it)."""
    name = hashlib.blake2b(str(key).encode(), digest_size=8).hexdigest()
    base = os.path.join(_run_dir(), name)
    return EventEndpoints(f"ipc://{base}.pub", f"ipc://{base}.replay")


def remote_endpoints(version: VersionConfig, url: str, index: int = 0) -> EventEndpoints | None:
    """A remote engine's endpoints: the version's ``kv_events`` entry for replica ``index``,
    else its URL's host at the version's ports (None: not set)."""
    if index < len(version.kv_events):
        publisher, _, named = version.kv_events[index].strip().partition(" ")
        return EventEndpoints(publisher, named.strip() or None)
    if version.kv_events_port is None:
        return None
    host = urlsplit(url).hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    replay = f"tcp://{host}:{version.kv_replay_port}" if version.kv_replay_port else None
    return EventEndpoints(f"tcp://{host}:{version.kv_events_port}", replay)


def engine_args(model: ModelConfig, key: ReplicaKey) -> list[str]:
    """``--kv-events-config`` for a local engine of ``model`` when its routing wants events."""
    if not wanted(model):
        return []
    where = local_endpoints(key)
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": where.publisher,
        "replay_endpoint": where.replay,
    }
    return ["--kv-events-config", json.dumps(config)]


def _flag(args: Sequence[str], name: str) -> str | None:
    found = None
    for i, arg in enumerate(args):
        head, eq, value = arg.partition("=")
        if head == name:
            found = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def _sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: Any) -> bytes:
    import cbor2  # only for engines that chose it; comes with vLLM

    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def external(block_hash: bytes | int) -> int:
    """A block hash as events give it (int) from either form."""
    if isinstance(block_hash, int):
        return block_hash & LOW64
    return int.from_bytes(block_hash, "big") & LOW64


class BlockHasher:
    """The chained block hashes an engine gives a prompt's full blocks."""

    def __init__(self, algo: str = "sha256", seed: str = DEFAULT_SEED) -> None:
        if algo not in HASH_ALGOS:
            raise ConfigError(
                f"--prefix-caching-hash-algo {algo}: KV-aware routing needs one of"
                f" {', '.join(HASH_ALGOS)} (xxhash seeds each engine at random)"
            )
        self.algo = algo
        self._hash: Callable[[Any], bytes] = _sha256_pickle if algo == "sha256" else _sha256_cbor
        self.none_hash = self._hash(seed)

    def __repr__(self) -> str:
        return f"BlockHasher({self.algo})"

    def hashes(
        self,
        tokens: Sequence[int],
        block_size: int,
        limit: int | None = None,
        *,
        lora: tuple[str, str] | None = None,
        salt: str | None = None,
    ) -> list[int]:
        """The external hash of each full block of ``tokens`` (at most ``limit`` blocks),
        for a request on LoRA adapter ``lora`` (its name and path) and with ``cache_salt``
        ``salt``, if given."""
        count = len(tokens) // block_size
        if limit is not None:
            count = min(count, limit)
        every: tuple[Any, ...] = () if lora is None else (("lora", *lora),)
        first = every + ((("cache_salt", salt),) if salt else ())
        parent = self.none_hash
        out: list[int] = []
        for n in range(count):
            block = tuple(tokens[n * block_size : (n + 1) * block_size])
            extra = (first if n == 0 else every) or None
            parent = self._hash((parent, block, extra))
            out.append(external(parent))
        return out


@dataclass(frozen=True)
class HashSettings:
    """What a version's engines hash blocks with, read from their flags and environment."""

    algo: str
    seed: str
    block_size: int  # until its events say otherwise

    @classmethod
    def of(
        cls, version: VersionConfig, host: str = "cpu", environ: Mapping[str, str] | None = None
    ) -> HashSettings:
        env = os.environ if environ is None else environ
        args = version.engine_args
        algo = _flag(args, "--prefix-caching-hash-algo") or "sha256"
        seed = version.env.get("PYTHONHASHSEED") or env.get("PYTHONHASHSEED") or DEFAULT_SEED
        size = _flag(args, "--block-size")
        return cls(algo, seed, int(size) if size else DEFAULT_BLOCK_SIZE.get(host, 16))

    def hasher(self) -> BlockHasher:
        return _hasher(self.algo, self.seed)


@functools.cache
def _hasher(algo: str, seed: str) -> BlockHasher:
    return BlockHasher(algo, seed)
