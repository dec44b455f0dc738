"""What one request holds while it runs, released once.

A ``Lease`` is opened when a request names a model and holds, as the request acquires
them, its limit ticket (tokens reserved), its bulkhead slot, its attempt on a replica
(the replica's in-flight count and breaker) and its observation (metrics, the access log,
the version tracker that drains and canary gates read). ``end`` releases all of it exactly
once, whichever way the request ended: answered, refused, failed mid-stream, or left by
its client; later calls do nothing. The ticket settles to the tokens ``used`` recorded,
or is released when nothing was recorded (a failure before an answer) or the client left
before any content (a stream left later is charged what it was sent);
its budgets settle to what the request cost (``serving.billing.meter``), and its ledger row
is taken here, the one place every request ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.billing.prices import Price
from serving.errors import spec_for
from serving.limits.limiter import UNLIMITED_TICKET, Ticket, Unlimited
from serving.observe.record import Observation
from serving.routing.bulkhead import Slot
from serving.routing.dispatch import Attempt

if TYPE_CHECKING:
    from serving.billing.meter import Meter

CLIENT_LEFT = 499


def error_code(error: BaseException) -> str:
    spec = spec_for(error)
    return spec.code if spec is not None else "internal_error"


class Lease:
    __slots__ = (
        "_ended", "attempt", "meter", "obs", "price", "prompt_tokens", "slot", "team",
        "ticket", "tokens", "usage", "worst_cost",
    )  # fmt: skip

    def __init__(self, obs: Observation, meter: Meter | None = None) -> None:
        self.obs = obs
        self.meter = meter  # prices, budgets and the ledger row (serving.billing)
        self.price: Price | None = None  # in effect when the request was admitted
        self.team: str | None = None
        self.prompt_tokens = 0  # as counted at admission
        self.worst_cost = 0  # nano-dollars reserved against its budgets
        self.ticket: Ticket | Unlimited = UNLIMITED_TICKET
        self.slot: Slot | None = None
        self.attempt: Attempt | None = None
        self.tokens: int | None = None  # what to charge; None releases the reservation
        self.usage: dict[str, Any] | None = None  # the engine's usage, for the metrics
        self._ended = False

    def __repr__(self) -> str:
        return f"Lease(ended={self._ended}, tokens={self.tokens})"

    def used(self, tokens: int, usage: dict[str, Any] | None = None) -> None:
        """The request used ``tokens`` (what its ticket will be charged)."""
        self.tokens = tokens
        if usage is not None:
            self.usage = usage

    def end(self, status: int, error: BaseException | None = None) -> None:
        """Release everything held. ``status`` is what the client got (200 for a stream
        that had started, even if it then failed: ``error`` says so); 499 when it left."""
        if self._ended:
            return
        self._ended = True
        left = status == CLIENT_LEFT
        meter = self.meter
        cost, basis = meter.cost(self, left) if meter is not None else (0, "none")
        self.ticket.finish(self._left_tokens() if left else self.tokens, cost)
        if self.attempt is not None:
            self.attempt.end(error, left=left)
        if self.slot is not None:
            self.slot.release()
        if left:
            code: str | None = "client_closed_request"
        else:
            code = error_code(error) if error is not None else None
        self.obs.finish(status, error_type=code, usage=None if left else self.usage)
        if meter is not None:
            meter.record(self, status, code, cost, basis)

    def _left_tokens(self) -> int | None:
        """What a request its client left is charged: its usage if the engine reported it,
        else the prompt plus the content chunks it was sent (as its money budget is), else
        nothing (the reservation is released): a stream read to its last chunk and then
        dropped is not free."""
        if self.tokens is not None:
            return self.tokens
        chunks = self.obs.chunks
        return self.prompt_tokens + chunks if chunks else None
