"""One way to reach Redis on the hot path: a bounded pool and one timeout for everything.

A burst of requests queues for a connection (at most ``timeout_s``) instead of opening
hundreds at once; connect, read and the wait for a connection share the same bound.
"""

from __future__ import annotations

import redis.asyncio as aioredis


def bounded_redis(url: str, timeout_s: float, connections: int = 64) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis(connection_pool=pool)


async def close(client: aioredis.Redis) -> None:
    await client.aclose()
    await client.connection_pool.disconnect()
