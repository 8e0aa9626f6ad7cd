"""The session store on Redis (TCNSERVE_SESSION_STORE=redis://host:port/db), redis-py asyncio.

Each session is one hash, `tcnserve:s:<owner>:<id>` = {replica, epoch, record}, expiring
`ttl_ms` after its last write. Every operation that reads and then changes ownership is one Lua
script, so it is atomic on the Redis server: two replicas claiming one session cannot both win,
and a write carries (replica, epoch) and is dropped unless both still match (fencing).
Liveness: `tcnserve:alive:<replica>` expires unless renewed; messages to a replica go to the
channel `tcnserve:replica:<replica>` (pub/sub). One Redis (or a Sentinel-managed primary);
the scripts touch keys they are not given, so Redis Cluster is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.store.base import Claim, MessageHandler, SessionKey, SessionStore, Stored, Write

logger = logging.getLogger(__name__)

PREFIX = "tcnserve:"
HEARTBEAT_TTL_MS = 5000  # a replica silent this long is gone: its sessions are taken at once

# ARGV: me, record, ttl_ms. Stored already: 1 only if by an earlier try of this register.
_REGISTER = """
local v = redis.call('HMGET', KEYS[1], 'replica', 'epoch', 'record')
if v[2] then
  if v[1] == ARGV[1] and tonumber(v[2]) == 1 and v[3] == ARGV[2] then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'epoch', 1, 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# ARGV: me, force, owner, session id. Returns {status, epoch, record}.
_CLAIM = """
local v = redis.call('HMGET', KEYS[1], 'replica', 'epoch', 'record')
if not v[2] then return {'missing', 0, ''} end
local owner = v[1]
local epoch = tonumber(v[2])
if owner == ARGV[1] then return {'taken', epoch, v[3]} end
local note = ARGV[3] .. ' ' .. ARGV[4]
if owner ~= '' and ARGV[2] == '0'
    and redis.call('EXISTS', 'tcnserve:alive:' .. owner) == 1 then
  redis.call('PUBLISH', 'tcnserve:replica:' .. owner, 'handoff ' .. note)
  return {'busy', epoch, ''}
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'epoch', epoch)
if owner ~= '' then redis.call('PUBLISH', 'tcnserve:replica:' .. owner, 'taken ' .. note) end
return {'taken', epoch, v[3]}
"""

# ARGV: me, epoch, has record, record, ttl_ms, release. A record the store lost (a Redis
# restart) is written again by its owner; one another replica owns is left alone.
_SAVE = """
local v = redis.call('HMGET', KEYS[1], 'replica', 'epoch')
if not v[2] then
  if ARGV[3] ~= '1' then return 0 end
  redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'epoch', ARGV[2])
elseif v[1] ~= ARGV[1] or tonumber(v[2]) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'record', ARGV[4]) end
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'replica', '') end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

_DELETE = """
local v = redis.call('HMGET', KEYS[1], 'replica', 'epoch')
if v[1] ~= ARGV[1] or tonumber(v[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def session_key(key: SessionKey) -> str:
    owner, session_id = key
    return f"{PREFIX}s:{owner}:{session_id}"


class RedisStore(SessionStore):
    def __init__(
        self, url: str, timeout_s: float | None = None, heartbeat_ttl_ms: int = HEARTBEAT_TTL_MS
    ):
        self.url = url
        self.replica = ""
        self._heartbeat_ttl_ms = heartbeat_ttl_ms
        # A store that stops answering (a stalled Redis) fails each operation after timeout_s
        # instead of holding it forever: snapshots then count as not written (durability.py).
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._register = self._redis.register_script(_REGISTER)
        self._claim = self._redis.register_script(_CLAIM)
        self._save = self._redis.register_script(_SAVE)
        self._delete = self._redis.register_script(_DELETE)
        self._listener: asyncio.Task | None = None

    def where(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.split('@')[-1]}"  # redis://user:password@host:port/db

    async def connect(self, replica: str, on_message: MessageHandler) -> None:
        self.replica = replica
        await self._redis.ping()
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(f"{PREFIX}replica:{replica}")
        self._listener = asyncio.create_task(self._listen(pubsub, on_message), name="store-pubsub")
        await self.heartbeat()

    async def _listen(self, pubsub, on_message: MessageHandler) -> None:
        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=1.0)
                except RedisError:
                    logger.warning("session store: lost the pub/sub connection; reconnecting")
                    await asyncio.sleep(0.5)
                    continue
                if message is None or message.get("type") != "message":
                    continue
                kind, _, rest = message["data"].decode().partition(" ")
                owner, _, session_id = rest.partition(" ")
                try:
                    await on_message(kind, owner, session_id)
                except Exception:
                    logger.exception("session store: handling %r failed", kind)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def heartbeat(self) -> None:
        await self._redis.set(f"{PREFIX}alive:{self.replica}", b"1", px=self._heartbeat_ttl_ms)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        with contextlib.suppress(RedisError):
            await self._redis.delete(f"{PREFIX}alive:{self.replica}")
        await self._redis.aclose()

    async def register(self, key: SessionKey, record: bytes, ttl_ms: int) -> bool:
        keys, args = [session_key(key)], [self.replica, record, ttl_ms]
        return bool(await self._register(keys=keys, args=args))

    async def claim(self, key: SessionKey, force: bool = False) -> Claim:
        args = [self.replica, "1" if force else "0", *key]
        status, epoch, record = await self._claim(keys=[session_key(key)], args=args)
        status = status.decode()
        return Claim(status, int(epoch), record if status == "taken" else None)

    async def save(self, writes: list[Write]) -> list[bool]:
        if not writes:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for w in writes:
                has = w.record is not None
                args = [self.replica, w.epoch, "1" if has else "0", w.record if has else b""]
                args += [w.ttl_ms, "1" if w.release else "0"]
                await self._save(keys=[session_key(w.key)], args=args, client=pipe)
            return [bool(r) for r in await pipe.execute()]

    async def delete(self, key: SessionKey, epoch: int) -> bool:
        args = [self.replica, epoch]
        return bool(await self._delete(keys=[session_key(key)], args=args))

    async def read(self, key: SessionKey) -> Stored | None:
        values = await self._redis.hmget(session_key(key), ["replica", "epoch", "record"])
        if values[1] is None:
            return None
        return Stored(values[0].decode(), int(values[1]), values[2] or b"")
