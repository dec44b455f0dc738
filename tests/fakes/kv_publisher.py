"""A KV event publisher on vLLM's wire format, for events a real engine cannot be made to
send on demand (an eviction, a restart, a lost batch).

The same as ``vllm.distributed.kv_events.ZmqEventPublisher`` (importing it takes vLLM and
torch): a PUB socket sends ``(topic, seq as 8 bytes big-endian, payload)``, the payload an
``EventBatch`` in msgpack (``[ts, [event, ...], dp_rank]``, each event a map tagged by
``type``); a ROUTER socket answers ``(b"", start seq)`` with every buffered batch from
there, then ``(b"", b"", -1, b"")``. The real engine's events are checked against the
same reader in tests/integration/test_kv_routing_engine.py.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import msgspec
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def stored(hashes: list[int], tokens: list[int], block_size: int) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


def removed(hashes: list[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


class KvPublisher:
    """Publishes event batches; serves replays from its buffer (in its own thread)."""

    def __init__(self, endpoint: str, replay: str | None) -> None:
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.bind(endpoint)
        self._replay = None
        if replay is not None:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.bind(replay)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self._seq = 0
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def publish(self, *events: dict[str, Any], send: bool = True) -> int:
        """One batch of ``events``; ``send=False`` keeps it only for replays (a lost batch)."""
        payload = msgspec.msgpack.encode([time.time(), list(events), 0])
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
            if send:
                self._pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        return seq

    def _serve(self) -> None:
        while self._running:
            if self._replay is None or not self._replay.poll(50):
                time.sleep(0.02)
                continue
            with self._lock:
                client, _, start = self._replay.recv_multipart()
                first = int.from_bytes(start, "big")
                for seq, payload in self._buffer:
                    if seq >= first:
                        self._replay.send_multipart(
                            [client, b"", b"", seq.to_bytes(8, "big"), payload]
                        )
                self._replay.send_multipart([client, b"", b"", END_SEQ, b""])

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._context.term()
