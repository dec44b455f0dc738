"""Which KV blocks each replica holds, from its engine's KV event stream.

One ``Follower`` task per replica that publishes events (``models.engines.kv_events``)
subscribes to its PUB socket and keeps a ``ReplicaBlocks``: the block hashes stored and
not yet removed, at most ``max_blocks`` (the oldest stored go first, as the engine's LRU
would evict them). Its state is rebuilt from the engine's replay socket whenever it cannot
be trusted: on (re)connect, on a gap in the sequence numbers, when the sequence starts
over (a new publisher: the engine restarted), and when the replica comes back from being
unhealthy or its process restarted, which also empties it first. Until a rebuild has
finished a replica's blocks are not ``ready`` and routing does not read them.

``KvIndex`` keeps the followers in step with the fleet: one for each replica that has
endpoints, dropped (task and blocks) when the replica leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from models.engines.fleet import Fleet, Replica
from models.engines.kv_events import EventEndpoints, external

log = logging.getLogger("weir.kv")

MAX_MESSAGE_BYTES = 64 * 2**20  # one event batch; a bigger frame drops the connection
REPLAY_TIMEOUT_S = 5.0  # a replay's next batch (vLLM answers within its 0.1 s poll)
POLL_S = 0.5  # how often a follower looks at its replica's health between batches
RETRY_S = 1.0  # before subscribing again after a failure
SYNC_S = 1.0  # how often the index looks for replicas joining and leaving
INDEXED_MEDIA = (None, "GPU")  # the engine's own cache (offloaded tiers are not matched)
END_SEQ = -1

Watcher = Callable[[Replica, str], None]  # (replica, why) on each rebuild


@dataclass(eq=False)
class ReplicaBlocks:
    """The blocks one replica holds, in the order they were stored."""

    max_blocks: int
    blocks: dict[int, None] = field(default_factory=dict)
    block_size: int | None = None  # from its events
    ready: bool = False  # rebuilt and following; False: do not route on it
    seq: int = -1  # the last batch applied

    def clear(self) -> None:
        self.blocks.clear()

    def matched(self, hashes: Sequence[int]) -> int:
        """How many of ``hashes``, from the first, this replica holds (vLLM reuses a
        prefix of blocks only)."""
        count = 0
        for block in hashes:
            if block not in self.blocks:
                break
            count += 1
        return count

    def apply(self, payload: bytes) -> None:
        """One event batch (``[ts, events, dp_rank]`` in msgpack) applied."""
        batch = msgspec.msgpack.decode(payload)
        if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
            raise ValueError("not a KV event batch")
        for event in batch[1]:
            if isinstance(event, dict):
                self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "AllBlocksCleared":
            self.blocks.clear()
            return
        if event.get("medium") not in INDEXED_MEDIA:
            return
        hashes = event.get("block_hashes") or []
        if kind == "BlockStored":
            size = event.get("block_size")
            tokens = event.get("token_ids") or []
            if isinstance(size, int) and size > 0 and len(tokens) == size * len(hashes):
                self.block_size = size
            for block in hashes:
                key = external(block)
                self.blocks.pop(key, None)  # stored again: the newest
                self.blocks[key] = None
            while len(self.blocks) > self.max_blocks:
                del self.blocks[next(iter(self.blocks))]
        elif kind == "BlockRemoved":
            for block in hashes:
                self.blocks.pop(external(block), None)


class Follower:
    """Follows one replica's event stream into its ``ReplicaBlocks``."""

    def __init__(
        self,
        replica: Replica,
        endpoints: EventEndpoints,
        blocks: ReplicaBlocks,
        context: zmq.asyncio.Context,
        on_rebuild: Watcher | None = None,
    ) -> None:
        self.replica = replica
        self.endpoints = endpoints
        self.blocks = blocks
        self.context = context
        self.on_rebuild = on_rebuild
        self._skip_to = -1  # batches at or before this came in a replay: duplicates

    def __repr__(self) -> str:
        return f"Follower({self.replica.key}, {self.endpoints.publisher})"

    async def run(self) -> None:
        while True:
            sub = self.context.socket(zmq.SUB)
            sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                await self._follow(sub)
            except (zmq.ZMQError, ValueError, TimeoutError, msgspec.DecodeError) as exc:
                log.warning("KV events of %s: %s; subscribing again", self.replica.key, exc)
            finally:
                self.blocks.ready = False
                sub.close(linger=0)
            await asyncio.sleep(RETRY_S)

    def _life(self) -> tuple[bool, float | None]:
        """What says the engine may have restarted: its health, its process's start."""
        process = self.replica.process
        return self.replica.healthy, (process.started_at if process is not None else None)

    async def _follow(self, sub: zmq.asyncio.Socket) -> None:
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        sub.connect(self.endpoints.publisher)  # after the monitor: its CONNECTED is seen
        connected = False
        why = "connected"
        life = self._life()
        try:
            while True:
                now = self._life()
                if now != life:
                    life = now
                    self._forget()  # out of rotation or restarted: whatever it held may be gone
                    why = "replica back"
                if not self.blocks.ready and connected and now[0]:
                    await self._rebuild(why)
                ready = dict(await poller.poll(int(POLL_S * 1000)))
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())
                    connected = event["event"] == zmq.EVENT_CONNECTED
                    self._forget()  # a new connection may be a new publisher: rebuild
                    why = "connected"
                if sub in ready:
                    await self._receive(await sub.recv_multipart())
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)

    def _forget(self) -> None:
        self.blocks.ready = False
        self.blocks.clear()
        self.blocks.seq = -1

    async def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            raise ValueError(f"a KV event message of {len(frames)} frames")
        if not self.blocks.ready:
            return  # the rebuild's replay has it
        seq = int.from_bytes(frames[1], "big", signed=True)
        last = self.blocks.seq
        if seq <= self._skip_to:
            return  # already had it from the replay
        self._skip_to = -1
        if seq <= last:
            await self._rebuild("sequence restarted")  # a new publisher: restarted
        elif seq > last + 1:
            await self._catch_up(last + 1, seq, frames[2])
        else:
            self.blocks.apply(frames[2])
            self.blocks.seq = seq

    async def _catch_up(self, start: int, seq: int, payload: bytes) -> None:
        """Batches ``start``..``seq - 1`` were missed: from the replay socket, or rebuild."""
        if self.endpoints.replay is None:
            self.blocks.apply(payload)  # nothing to ask: some blocks may be missing
            self.blocks.seq = seq
            return
        first = await self._replay(start)
        if first is None or first > start:
            await self._rebuild("gap past the replay buffer")
        elif self.blocks.seq < seq:
            self.blocks.apply(payload)
            self.blocks.seq = seq
        self._skip_to = self.blocks.seq

    async def _rebuild(self, why: str) -> None:
        """Empty, then everything the publisher still has (its replay buffer)."""
        self._forget()
        if self.on_rebuild is not None:
            self.on_rebuild(self.replica, why)
        if not self.replica.healthy:
            return  # rebuilt when it comes back
        if self.endpoints.replay is not None:
            await self._replay(0)
        self._skip_to = self.blocks.seq
        self.blocks.ready = True

    async def _replay(self, start: int) -> int | None:
        """Apply the buffered batches from ``start`` on; the first one's seq (None: none)."""
        assert self.endpoints.replay is not None
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        first: int | None = None
        try:
            dealer.connect(self.endpoints.replay)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(int(REPLAY_TIMEOUT_S * 1000)):
                    raise TimeoutError(f"no replay from {self.endpoints.replay}")
                frames = await dealer.recv_multipart()
                if len(frames) != 4:
                    raise ValueError(f"a replay message of {len(frames)} frames")
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    return first
                first = seq if first is None else first
                if seq > self.blocks.seq:
                    self.blocks.apply(frames[3])
                    self.blocks.seq = seq
        finally:
            dealer.close(linger=0)


class KvIndex:
    """Every event-publishing replica's blocks, kept in step with the fleet."""

    def __init__(
        self,
        endpoints_of: Callable[[Replica], EventEndpoints | None],
        max_blocks_of: Callable[[Replica], int],
        *,
        on_rebuild: Watcher | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.on_tick = on_tick  # every SYNC_S (metrics)
        self.endpoints_of = endpoints_of
        self.max_blocks_of = max_blocks_of
        self.on_rebuild = on_rebuild
        self._context: zmq.asyncio.Context | None = None
        self._followed: dict[Replica, tuple[ReplicaBlocks, asyncio.Task[None]]] = {}
        self._watch: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"KvIndex(replicas={len(self._followed)})"

    def blocks(self, replica: Replica) -> ReplicaBlocks | None:
        found = self._followed.get(replica)
        return None if found is None else found[0]

    def followed(self) -> dict[Replica, ReplicaBlocks]:
        return {replica: blocks for replica, (blocks, _) in self._followed.items()}

    def sync(self, replicas: Sequence[Replica]) -> None:
        """Follow replicas that joined; drop those that left (their blocks too)."""
        present = set(replicas)
        for gone in [r for r in self._followed if r not in present]:
            self._followed.pop(gone)[1].cancel()
        for replica in replicas:
            if replica in self._followed:
                continue
            endpoints = self.endpoints_of(replica)
            if endpoints is None:
                continue
            if self._context is None:
                self._context = zmq.asyncio.Context()
            blocks = ReplicaBlocks(self.max_blocks_of(replica))
            follower = Follower(replica, endpoints, blocks, self._context, self.on_rebuild)
            task = asyncio.create_task(follower.run(), name=f"kv events {replica.key}")
            self._followed[replica] = (blocks, task)

    def start(self, fleet: Fleet) -> None:
        """Follow ``fleet``'s replicas as they come and go (deploys, DNS discovery)."""
        self.sync(fleet.replicas)
        self._watch = asyncio.create_task(self._keep_up(fleet), name="kv index")

    async def _keep_up(self, fleet: Fleet) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            self.sync(fleet.replicas)
            if self.on_tick is not None:
                self.on_tick()

    async def stop(self) -> None:
        tasks = [task for _, task in self._followed.values()]
        if self._watch is not None:
            tasks.append(self._watch)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._followed.clear()
        if self._context is not None:
            self._context.term()
            self._context = None
