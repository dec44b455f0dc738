"""Which replica gets a request: least outstanding, with optional prefix affinity.

Only replicas that are healthy and whose breaker lets requests through are candidates.
Ties go round robin. With affinity, requests whose prompts share a prefix go to the
same replica (rendezvous hashing, stable as replicas come and go) so vLLM's prefix
cache hits, unless that replica is ``slack`` requests busier than the least busy.

A candidate is a replica with its routing state (``ReplicaLoad``), as the dispatcher
pairs them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence

from models.engines.fleet import Replica
from serving.routing.load import ReplicaLoad

Candidate = tuple[Replica, ReplicaLoad]


def eligible(candidates: Iterable[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c[0].healthy and c[1].breaker.available()]


class LeastOutstanding:
    def __init__(self, slack: int = 4) -> None:
        self.slack = slack
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], affinity: str | None = None) -> Candidate:
        """One of ``candidates`` (not empty)."""
        least = min(load.outstanding for _, load in candidates)
        if affinity is not None:
            digest = hashlib.blake2b(affinity.encode(), digest_size=16).digest()
            preferred = max(candidates, key=lambda c: _score(digest, c[0]))
            if preferred[1].outstanding <= least + self.slack:
                return preferred
        idle = [c for c in candidates if c[1].outstanding == least]
        return idle[next(self._turn) % len(idle)]


def _score(digest: bytes, replica: Replica) -> bytes:
    """Rendezvous weight: the same on every gateway process (no salted ``hash``)."""
    return hashlib.blake2b(digest + str(replica.key).encode(), digest_size=8).digest()
