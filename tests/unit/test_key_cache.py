"""The gateway's key cache: one store call per burst, expiry, revocation, Redis blips."""

from __future__ import annotations

import asyncio

import pytest

from serving.keys.cache import CachedKeyStore
from serving.keys.records import KeyRecord, hash_secret, new_secret
from serving.keys.store import KeyStoreUnavailable, UnknownKey


class CountingStore:
    """An in-memory key store that counts lookups and can be made unreachable."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.lookups = 0
        self.down = False

    async def add(self, record: KeyRecord) -> None:
        self.records[record.hash] = record

    async def lookup(self, secret: str) -> KeyRecord | None:
        self.lookups += 1
        await asyncio.sleep(0.01)  # a round trip: concurrent callers overlap
        if self.down:
            raise KeyStoreUnavailable("key store unreachable: ConnectionError")
        return self.records.get(hash_secret(secret))

    async def list(self) -> list[KeyRecord]:
        return list(self.records.values())

    async def revoke(self, key_id: str) -> KeyRecord:
        for record in self.records.values():
            if record.id.startswith(key_id):
                revoked = KeyRecord.from_dict({**record.to_dict(), "revoked": True})
                self.records[record.hash] = revoked
                return revoked
        raise UnknownKey(key_id)

    async def aclose(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def setup() -> tuple[CountingStore, CachedKeyStore, Clock, str, KeyRecord]:
    store, clock = CountingStore(), Clock()
    secret = new_secret()
    record = KeyRecord(hash=hash_secret(secret), name="k")
    await store.add(record)
    return store, CachedKeyStore(store, ttl_s=5, stale_s=60, clock=clock), clock, secret, record


@pytest.mark.anyio
async def test_a_burst_makes_one_store_call_and_expiry_makes_another() -> None:
    store, cached, clock, secret, record = await setup()
    found = await asyncio.gather(*(cached.lookup(secret) for _ in range(180)))
    assert {r.id for r in found if r is not None} == {record.id}
    assert store.lookups == 1
    clock.now = 4.9
    await cached.lookup(secret)
    assert store.lookups == 1
    clock.now = 5.1
    await cached.lookup(secret)
    assert store.lookups == 2


@pytest.mark.anyio
async def test_revocation_here_applies_at_once() -> None:
    _, cached, _clock, secret, record = await setup()
    await cached.lookup(secret)
    await cached.revoke(record.id)
    again = await cached.lookup(secret)
    assert again is not None
    assert again.revoked


@pytest.mark.anyio
async def test_known_keys_survive_a_store_outage_unknown_ones_do_not() -> None:
    store, cached, clock, secret, record = await setup()
    await cached.lookup(secret)
    store.down = True
    clock.now = 30  # expired, store down: the record seen 30 s ago still serves
    found = await cached.lookup(secret)
    assert found is not None
    assert found.id == record.id
    with pytest.raises(KeyStoreUnavailable):
        await cached.lookup(new_secret())
    clock.now = 61  # beyond stale_s: no more
    with pytest.raises(KeyStoreUnavailable):
        await cached.lookup(secret)


@pytest.mark.anyio
async def test_unknown_keys_are_remembered_briefly() -> None:
    store, cached, clock, _, _ = await setup()
    stranger = new_secret()
    assert await cached.lookup(stranger) is None
    assert await cached.lookup(stranger) is None
    assert store.lookups == 1
    clock.now = 1.5
    assert await cached.lookup(stranger) is None
    assert store.lookups == 2


@pytest.mark.anyio
async def test_a_stale_record_is_off_by_default_so_a_revocation_elsewhere_wins() -> None:
    store, clock = CountingStore(), Clock()
    secret = new_secret()
    record = KeyRecord(hash=hash_secret(secret), name="k")
    await store.add(record)
    cached = CachedKeyStore(store, ttl_s=5, clock=clock)  # stale_s as the gateway defaults
    assert await cached.lookup(secret) is not None
    await store.revoke(record.id)  # the CLI or another gateway: this one cannot know
    store.down = True
    clock.now = 6  # past the ttl, Redis down: the record it holds may be revoked
    with pytest.raises(KeyStoreUnavailable):
        await cached.lookup(secret)


@pytest.mark.anyio
async def test_a_revocation_seen_here_wins_over_a_lookup_in_flight_and_an_outage() -> None:
    store, cached, clock, secret, record = await setup()  # stale_s = 60
    in_flight = asyncio.create_task(cached.lookup(secret))
    await asyncio.sleep(0)  # the lookup has asked the store
    await cached.revoke(record.id)
    await in_flight  # answered from before the revocation; it must not be remembered
    found = await cached.lookup(secret)
    assert found is not None
    assert found.revoked
    store.down = True
    cached._entries.clear()  # e.g. the bounded cache started over
    clock.now = 30
    for _ in range(3):  # while Redis is down: still revoked (401), not 503, never stale
        found = await cached.lookup(secret)
        assert found is not None
        assert found.revoked


@pytest.mark.anyio
async def test_a_revocation_seen_in_a_lookup_is_remembered() -> None:
    store, cached, clock, secret, record = await setup()
    await cached.lookup(secret)
    await store.revoke(record.id)
    clock.now = 6
    seen = await cached.lookup(secret)
    assert seen is not None
    assert seen.revoked
    lookups = store.lookups
    store.down = True
    cached._entries.clear()
    clock.now = 20
    again = await cached.lookup(secret)
    assert again is not None
    assert again.revoked
    assert store.lookups == lookups  # no store call for a key known revoked
