"""``RedisLimitStore``: every check and reservation in one Lua script, one round trip.

The script reads Redis's own clock (``TIME``), so every gateway agrees on the window,
whatever its host clock says. Counters are ``<scope>:<window start>`` strings that expire
two windows after they start (never before their window ends); concurrency slots are a
sorted set of reservation ids scored by lease end; each admitted request leaves a
``res:<id>`` hash that ``settle`` consumes exactly once (a second settle is a no-op), and
that expires with its lease if the gateway holding it dies. All keys share the ``{rl}``
hash tag, so on Redis Cluster they live in one slot and the scripts stay legal.

Run this Redis with ``maxmemory-policy noeviction``: an evicted counter is a limit lost.
Errors of the client become ``LimitStoreUnavailable`` here. ``make_limit_store`` picks the
store a configuration gets: this one when it names a Redis, else the in-process one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from redis.exceptions import RedisError

from serving.limits.plan import PREFIX, Check
from serving.limits.store import (
    Decision,
    LimitStore,
    LimitStoreUnavailable,
    MemoryLimitStore,
    Outstanding,
    Standing,
)
from serving.redis_client import bounded_redis, close

MODEL_TPM = PREFIX + "model-tpm"
RESERVATION = PREFIX + "res:"

# KEYS[1] reservation hash, KEYS[2] model-tpm hash, KEYS[3..] one scope per check.
# ARGV: rid, lease_s, model, then per check: kind, limit, window_s, amount.
# Returns {denied index (0: admitted), then per check: limit, remaining, reset in ms}.
# The UTC calendar month's first second, for a time (days-from-civil: Redis has no dates);
# ``serving.limits.store.month_start`` is the same arithmetic.
MONTH_START = """
local function month_start(now)
  local days = math.floor(now / 86400)
  local z = days + 719468
  local doe = z - math.floor(z / 146097) * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local dom = doy - math.floor((153 * mp + 2) / 5) + 1
  return (days - dom + 1) * 86400
end
"""

ADMIT = (
    MONTH_START
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rid, lease, model = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = #KEYS - 2
local out, keys, denied = {}, {}, 0
for i = 1, n do
  local j = 3 + (i - 1) * 4
  local kind, limit = ARGV[j + 1], tonumber(ARGV[j + 2])
  local window, amount = tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
  local scope = KEYS[i + 2]
  if kind == 'model_tokens' then
    local set = redis.call('HGET', KEYS[2], model)
    if set then limit = tonumber(set) end
  end
  local used, reset
  if kind == 'concurrency' then
    redis.call('ZREMRANGEBYSCORE', scope, '-inf', now)
    used = redis.call('ZCARD', scope)
    reset = 1
    keys[i] = scope
  elseif window == 0 then
    keys[i] = scope
    used = tonumber(redis.call('GET', keys[i]) or '0')
    reset = 0
  elseif window < 0 then
    local start = month_start(now)
    keys[i] = scope .. ':' .. start
    used = tonumber(redis.call('GET', keys[i]) or '0')
    reset = month_start(start + 32 * 86400) - now
  else
    local start = math.floor(now / window) * window
    keys[i] = scope .. ':' .. start
    used = tonumber(redis.call('GET', keys[i]) or '0')
    reset = start + window - now
  end
  local remaining = -1
  if limit >= 0 then
    remaining = limit - used - amount
    if remaining < 0 then
      if denied == 0 then denied = i end
      remaining = limit - used
      if remaining < 0 then remaining = 0 end
    end
  end
  out[#out + 1] = limit
  out[#out + 1] = remaining
  out[#out + 1] = math.floor(reset * 1000)
end
if denied == 0 then
  local record, tokens = {}, 0
  for i = 1, n do
    local j = 3 + (i - 1) * 4
    local kind, window, amount = ARGV[j + 1], tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4])
    if kind == 'concurrency' then
      redis.call('ZADD', keys[i], now + lease, rid)
      redis.call('EXPIRE', keys[i], math.ceil(lease) * 2)
    else
      redis.call('INCRBY', keys[i], amount)
      if window > 0 then
        redis.call('EXPIRE', keys[i], window * 2)
      elseif window < 0 then
        redis.call('EXPIRE', keys[i], 62 * 86400)
      end
      if (kind == 'tokens' or kind == 'model_tokens') and amount > tokens then tokens = amount end
    end
    record[#record + 1] = 'k' .. i
    record[#record + 1] = kind .. '|' .. amount .. '|' .. keys[i]
  end
  record[#record + 1] = 'tokens'
  record[#record + 1] = tokens
  redis.call('HSET', KEYS[1], unpack(record))
  redis.call('EXPIRE', KEYS[1], math.ceil(lease))
end
table.insert(out, 1, denied)
return out
"""
)

# KEYS[1] reservation hash. ARGV: rid, used tokens, cost (nano-dollars, for budgets).
# Returns 1 if settled now, 0 if it was settled before or its lease ran out.
SETTLE = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return 0 end
local used, cost = tonumber(ARGV[2]), tonumber(ARGV[3] or '0')
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 1) == 'k' then
    local kind, amount, key = string.match(fields[i + 1], '^([^|]+)|([^|]+)|(.+)$')
    if kind == 'concurrency' then
      redis.call('ZREM', key, ARGV[1])
    elseif kind ~= 'requests' and redis.call('EXISTS', key) == 1 then
      local charge = used
      if kind == 'budget' then charge = cost end
      local value = redis.call('INCRBY', key, charge - tonumber(amount))
      if value < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
    end
  end
end
redis.call('DEL', KEYS[1])
return 1
"""


class RedisLimitStore:
    def __init__(self, url: str, *, timeout_s: float = 0.5, connections: int = 64) -> None:
        self.url = url
        self._redis = bounded_redis(url, timeout_s, connections)
        self._admit = self._redis.register_script(ADMIT)
        self._settle = self._redis.register_script(SETTLE)

    def __repr__(self) -> str:
        return f"RedisLimitStore(url={self.url!r})"

    async def admit(
        self, rid: str, model: str, checks: Sequence[Check], lease_s: float
    ) -> Decision:
        keys = [RESERVATION + rid, MODEL_TPM, *(c.scope for c in checks)]
        args: list[Any] = [rid, lease_s, model]
        for c in checks:
            args += [c.kind, c.limit, c.window_s, c.amount]
        raw = await self._call(self._admit(keys=keys, args=args))
        denied = int(raw[0])
        standings = tuple(
            Standing(c, int(raw[1 + 3 * i]), int(raw[2 + 3 * i]), int(raw[3 + 3 * i]) / 1000)
            for i, c in enumerate(checks)
        )
        if denied:
            return Decision(False, standings, standings[denied - 1])
        return Decision(True, standings)

    async def settle(self, rid: str, used_tokens: int, cost: int = 0) -> bool:
        done = await self._call(
            self._settle(keys=[RESERVATION + rid], args=[rid, used_tokens, cost])
        )
        return bool(done)

    async def set_model_tpm(self, model: str, tpm: int | None) -> None:
        if tpm is None:
            await self._call(self._redis.hdel(MODEL_TPM, model))
        else:
            await self._call(self._redis.hset(MODEL_TPM, model, tpm))

    async def model_tpms(self) -> dict[str, int]:
        raw = await self._call(self._redis.hgetall(MODEL_TPM))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def outstanding(self) -> Outstanding:
        try:
            names = [n async for n in self._redis.scan_iter(match=RESERVATION + "*", count=1000)]
        except (RedisError, OSError) as exc:
            raise LimitStoreUnavailable(f"limit store unreachable: {type(exc).__name__}") from exc
        tokens = 0
        for name in names:
            value = await self._call(self._redis.hget(name, "tokens"))
            tokens += int(value or 0)
        return Outstanding(len(names), tokens)

    async def aclose(self) -> None:
        await close(self._redis)

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise LimitStoreUnavailable(f"limit store unreachable: {type(exc).__name__}") from exc


def make_limit_store(redis_url: str | None, timeout_s: float) -> LimitStore:
    """Redis (shared by every gateway) when a URL is configured, else the in-process store."""
    if redis_url:
        return RedisLimitStore(redis_url, timeout_s=timeout_s)
    return MemoryLimitStore()
