"""Load shapes as data: a stage table, and the ``tick`` that Locust's shape class reads.

A stage holds ``users`` (spawned at ``spawn_rate`` a second) until ``until_s`` seconds
into the run. Open-loop arrival (Poisson) is not a shape but a user class in the
locustfile, because it must send on schedule whatever the responses do. This module does
not import Locust (which monkey-patches the process on import); the locustfile wraps
``tick`` in a ``LoadTestShape``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    until_s: float
    users: int
    spawn_rate: float


def constant(users: int, duration_s: float) -> list[Stage]:
    return [Stage(duration_s, users, users)]


def step(users: int, duration_s: float, steps: int = 4) -> list[Stage]:
    """``steps`` equal plateaus rising to ``users``."""
    return [
        Stage(duration_s * (n + 1) / steps, max(1, users * (n + 1) // steps), users)
        for n in range(steps)
    ]


def spike(users: int, duration_s: float) -> list[Stage]:
    """A quarter of ``users``, then all of them for the middle fifth, then back."""
    base = max(1, users // 4)
    return [
        Stage(duration_s * 0.4, base, base),
        Stage(duration_s * 0.6, users, users * 4),
        Stage(duration_s, base, users * 4),
    ]


def soak(users: int, duration_s: float) -> list[Stage]:
    """A slow ramp to ``users`` over the first tenth, then hold."""
    return [
        Stage(duration_s * 0.1, users, max(1.0, users / (duration_s * 0.1))),
        Stage(duration_s, users, users),
    ]


SHAPES = {"constant": constant, "step": step, "spike": spike, "soak": soak}


def stages(name: str, users: int, duration_s: float) -> list[Stage]:
    try:
        return SHAPES[name](users, duration_s)
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}; known: {sorted(SHAPES)}") from None


def tick(table: list[Stage], elapsed_s: float) -> tuple[int, float] | None:
    """Users and spawn rate at ``elapsed_s``; None once the table is over (the run stops)."""
    for stage in table:
        if elapsed_s < stage.until_s:
            return stage.users, stage.spawn_rate
    return None
