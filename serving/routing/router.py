"""Which replica gets a request: least outstanding, with optional prefix affinity.

Only replicas that are healthy and whose breaker lets requests through are candidates.
Ties go round robin. With affinity, requests whose prompts share a prefix go to the
same replica (rendezvous hashing, stable as replicas come and go) so vLLM's prefix
cache hits, unless that replica is ``slack`` requests busier than the least busy.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

from models.engines.fleet import Replica


def eligible(replicas: Sequence[Replica]) -> list[Replica]:
    return [r for r in replicas if r.healthy and r.breaker.available()]


class LeastOutstanding:
    def __init__(self, slack: int = 4) -> None:
        self.slack = slack
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Replica], affinity: str | None = None) -> Replica:
        """One of ``candidates`` (not empty)."""
        least = min(r.outstanding for r in candidates)
        if affinity is not None:
            digest = hashlib.blake2b(affinity.encode(), digest_size=16).digest()
            preferred = max(candidates, key=lambda r: _score(digest, r))
            if preferred.outstanding <= least + self.slack:
                return preferred
        idle = [r for r in candidates if r.outstanding == least]
        return idle[next(self._turn) % len(idle)]


def _score(digest: bytes, replica: Replica) -> bytes:
    """Rendezvous weight: the same on every gateway process (no salted ``hash``)."""
    return hashlib.blake2b(digest + str(replica.key).encode(), digest_size=8).digest()
