"""A replica's routing state: its circuit breaker and the requests sent to it.

The fleet (``models.engines``) knows replicas as engines: health, processes, URLs. What
routing learns about them is kept here, one ``ReplicaLoad`` per replica, by the
``Dispatcher`` (``Dispatcher.load_of``).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.routing.breaker import CircuitBreaker


@dataclass(eq=False, slots=True)
class ReplicaLoad:
    breaker: CircuitBreaker
    outstanding: int = 0  # requests sent to it and not yet ended
    requests: int = 0  # attempts sent to it, ever
