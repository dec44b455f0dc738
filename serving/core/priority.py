"""A request's place in fair queueing: its tenant's share and its priority.

A key says its tenant, weight and priority (``serving.keys``); a request may lower its own
priority with ``"weir": {"priority": "batch"}`` (never raise it: a batch key's requests
stay batch), and the Batch API's calls are batch. Engines that run vLLM's
``--scheduling-policy priority`` get the priority in the body (lower goes first); the
client's own ``priority`` never reaches them.
"""

from __future__ import annotations

from typing import Any

from serving.cache.entries import extension
from serving.core.call import Call
from serving.errors import InvalidRequest
from serving.routing.bulkhead import PRIORITIES, Priority, Share

ENGINE_PRIORITY: dict[Priority, int] = {"interactive": 0, "batch": 10}


def share_of(extra: dict[str, Any] | None, call: Call) -> Share:
    """The share of ``call``'s caller at the lower of the request's, the call's and the
    key's priority; a priority that is not one raises ``InvalidRequest``."""
    asked = extension(extra or {}).get("priority")
    if asked is not None and asked not in PRIORITIES:
        raise InvalidRequest(
            f"weir.priority must be one of {', '.join(PRIORITIES)}.", param="weir.priority"
        )
    lowest: Priority | None = "batch" if "batch" in (asked, call.priority) else None
    return call.caller.share(lowest)
