"""Which replica gets a request, by the model's ``routing.strategy``.

Only replicas that are healthy and whose breaker lets requests through are candidates.

- ``least_outstanding``: the replica with the fewest requests in flight; ties go round
  robin. For prompts that share nothing.
- ``prefix_hash`` (also ``prefix_affinity = true``): requests whose prompts share their
  first characters go to the same replica (rendezvous hashing, stable as replicas come and
  go) so vLLM's prefix cache hits, unless that replica is ``slack`` requests busier than
  the least busy. Cheap, needs no engine support, but blind: prompts that share a system
  prompt and differ early split, and it cannot see evictions.
- ``kv_aware``: the replica whose engine holds the longest prefix of the prompt's KV
  blocks (from its KV events, ``kv_index``), against its load: a replica scores the tokens
  it holds minus ``kv_tokens_per_request`` for each request it has in flight beyond the
  least busy, and is never chosen when ``slack`` busier. A prompt whose first block no
  replica holds (``no_hit``) goes to the least busy replica, and the next prompts with
  that first block for ``PENDING_S`` go to the same one (within slack), so that requests
  arriving together with a new prefix prefill and cache it once, before any event about
  it has come back, while new prefixes still spread by load. For multi-turn chat, agents, RAG:
  long shared prefixes. Falls back to least outstanding when no candidate's events can be
  read (``no_events``), the prompt has no full block (``no_prefix``), or its blocks
  cannot be hashed as the engine hashes them (``Unmatched``: ``adapter_unknown``, a LoRA
  adapter the gateway did not load).

A candidate is a replica with its routing state (``ReplicaLoad``), as the dispatcher
pairs them.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from models.engines.fleet import Replica
from models.types import ReplicaKey
from serving.routing.load import ReplicaLoad

if TYPE_CHECKING:
    from models.config import RoutingConfig
    from serving.routing.kv_routing import KvRouting, PromptKey

Candidate = tuple[Replica, ReplicaLoad]
PENDING_S = 10.0  # a new prefix's placement is kept this long (its KV events come sooner)
PENDING_MAX = 4096  # new prefixes remembered at once


@dataclass(frozen=True)
class Unmatched:
    """A prompt whose KV blocks cannot be hashed as its engine hashes them: routed by
    load, counted under ``reason``."""

    reason: str


RouteKey: TypeAlias = "str | PromptKey | Unmatched | None"


class Router(Protocol):
    def choose(self, candidates: Sequence[Candidate], key: RouteKey = None) -> Candidate:
        """One of ``candidates`` (not empty)."""
        ...


def eligible(candidates: Iterable[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c[0].healthy and c[1].breaker.available()]


class LeastOutstanding:
    def __init__(self, slack: int = 4) -> None:
        self.slack = slack
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], key: RouteKey = None) -> Candidate:
        """One of ``candidates`` (not empty); a ``str`` key is a prompt prefix to keep on
        one replica (``prefix_hash``)."""
        least = min(load.outstanding for _, load in candidates)
        if isinstance(key, str):
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            preferred = max(candidates, key=lambda c: _score(digest, c[0]))
            if preferred[1].outstanding <= least + self.slack:
                return preferred
        return self.least(candidates, least)

    def least(self, candidates: Sequence[Candidate], least: int) -> Candidate:
        idle = [c for c in candidates if c[1].outstanding == least]
        return idle[next(self._turn) % len(idle)]


class KvAware:
    """Longest cached prefix against load (see the module's docstring)."""

    def __init__(
        self,
        model: str,
        kv: KvRouting,
        slack: int,
        tokens_per_request: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.kv = kv
        self.slack = slack
        self.tokens_per_request = tokens_per_request
        self.fallback = LeastOutstanding(slack)
        self.clock = clock
        # first-block hash of a new prefix: the replica it was sent to, and when
        self._pending: OrderedDict[int, tuple[ReplicaKey, float]] = OrderedDict()
        metrics = kv.metrics
        self._decided = {r: metrics.decisions.labels(model, r) for r in _REASONS}
        self._predicted = metrics.predicted.labels(model)
        self._prompt = metrics.prompt.labels(model)

    def __repr__(self) -> str:
        return f"KvAware({self.model}, per_request={self.tokens_per_request})"

    def choose(self, candidates: Sequence[Candidate], key: RouteKey = None) -> Candidate:
        least = min(load.outstanding for _, load in candidates)
        if isinstance(key, Unmatched):
            return self._fallback(candidates, least, key.reason)
        if key is None or isinstance(key, str):
            return self._fallback(candidates, least, "no_prefix")
        index = self.kv.index
        held: list[tuple[Candidate, int]] = []
        any_ready = False
        size = 0
        for candidate in candidates:
            blocks = index.blocks(candidate[0])
            if blocks is None or not blocks.ready:
                held.append((candidate, 0))
                continue
            any_ready = True
            size = blocks.block_size or self.kv.default_block_size(candidate[0].key.version_key)
            hashes = key.hashes(size)
            held.append((candidate, blocks.matched(hashes) * size if hashes else 0))
        self._prompt.inc(len(key.tokens))
        if not any_ready:
            return self._fallback(candidates, least, "no_events")
        best_hit = max(hit for _, hit in held)
        if best_hit == 0:
            self._decided["no_hit"].inc()
            first = key.hashes(size)  # the block size of the last replica with events
            if not first:
                return self.fallback.least(candidates, least)
            return self._place_new(candidates, least, first[0])
        usable = [(c, hit) for c, hit in held if c[1].outstanding <= least + self.slack]
        per = self.tokens_per_request

        def score(entry: tuple[Candidate, int]) -> tuple[int, int]:
            (_, load), hit = entry
            return hit - per * (load.outstanding - least), -load.outstanding

        chosen, hit = max(usable, key=score)
        if hit == 0:
            return self._fallback(candidates, least, "busy")
        self._decided["cache_hit"].inc()
        self._predicted.inc(hit)
        return chosen

    def _place_new(self, candidates: Sequence[Candidate], least: int, block: int) -> Candidate:
        """A prompt whose first block no replica holds: where that block was sent in the
        last ``PENDING_S`` (its prefill may still be running, its events not yet heard),
        within slack; else the least busy replica, remembered for the next ones."""
        now = self.clock()
        placed = self._pending.get(block)
        if placed is not None and now - placed[1] <= PENDING_S:
            for candidate in candidates:
                if candidate[0].key == placed[0] and candidate[1].outstanding <= least + self.slack:
                    return candidate
        chosen = self.fallback.least(candidates, least)
        self._pending[block] = (chosen[0].key, now)
        self._pending.move_to_end(block)
        while len(self._pending) > PENDING_MAX:
            self._pending.popitem(last=False)
        return chosen

    def _fallback(self, candidates: Sequence[Candidate], least: int, reason: str) -> Candidate:
        self._decided[reason].inc()
        return self.fallback.least(candidates, least)


_REASONS = ("cache_hit", "no_hit", "busy", "no_prefix", "no_events", "adapter_unknown")


def make_router(model: str, routing: RoutingConfig, kv: KvRouting | None) -> Router:
    """The router of ``routing.strategy`` (``kv_aware`` without an index: least outstanding)."""
    if routing.strategy == "kv_aware" and kv is not None:
        return KvAware(model, kv, routing.affinity_slack, routing.kv_tokens_per_request)
    return LeastOutstanding(routing.affinity_slack)


def _score(digest: bytes, replica: Replica) -> bytes:
    """Rendezvous weight: the same on every gateway process (no salted ``hash``)."""
    return hashlib.blake2b(digest + str(replica.key).encode(), digest_size=8).digest()
