"""The response cache on Redis: one cache every replica reads, so an answer one stored is a hit on another.

Each entry is one string (`Entry.dumps`: the plain answer, the stream's events and the usage chunk, with a
small header) under `{prefix}cache:{policy}:{model hash}:{key}`, set with a TTL of `ttl_s`. A put is one Lua
script (put.lua) that also keeps the policy's index (a sorted set by expiry, the sizes, the total bytes):
entries over `max_entries` or `max_bytes` are evicted, those that expire first going first; an entry over
`max_entry_bytes` is never sent; the bookkeeping keys expire with the last entry. Nothing grows without bound.

A hit is one GET on the cache's own connection (`policies.stores.resp`, opened by `redis_dial` as the
counter store's is: plain, TLS, Unix socket or the master Sentinel names), pipelined with every other call on
its way: a few microseconds of CPU, where redis-py's client spent 50-85. Bytes that are the same as the last
ones read for a key give back the entry decoded then (its replies included): a hit from Redis decodes
nothing it has decoded before. Puts go out in the background, after the answer: the client never waits for
them. redis-py's client is kept for the admin's SCAN.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from importlib import resources

from redis.exceptions import RedisError

from policies.stores import redis_dial
from policies.stores.redis_connect import Connect, open_pool, parse_url
from policies.stores.resp import ReplyError, RespConnection

from policies.cache.entry import Entry
from policies.stores.redis import safe_url
from proxy.telemetry.logs import emit

_PENDING_MAX = 256  # puts on their way at most; beyond, a put is dropped (the answer is simply not cached)
_DECODED_BYTES = 8 * 1024 * 1024  # entries decoded from Redis kept with their bytes (then forgotten all at once)


def _script(name: str) -> tuple[str, str]:
    text = resources.files("policies.cache").joinpath(name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


def model_part(model: str) -> str:
    return hashlib.sha1(model.encode()).hexdigest()[:16]


class RedisCache:
    backend = "redis"

    def __init__(self, url: str, policy: str, *, ttl_s: float, max_entries: int, max_bytes: int,
                 max_entry_bytes: int, timeout_s: float = 1.0, prefix: str = "gp:", connect=None) -> None:
        self.url = url
        self.connect = connect  # policies.stores.redis_connect.Connect: TLS, Sentinel, timeouts, pool size
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.timeout_s = timeout_s
        self.base = f"{prefix}cache:{policy}:"
        self.index, self.sizes, self.total = self.base + "index", self.base + "sizes", self.base + "bytes"
        self._in_flight = (self.base + "flight:", self.base + "followed:")
        self._put, self._forget = _script("put.lua"), _script("forget.lua")
        self._client = None
        self._sentinel = None
        self._connect_settings = None
        self._tasks: set[asyncio.Task] = set()
        self._held = (0, 0)
        self._warned = 0.0
        self._down_until = 0.0  # after a failure, a second of misses without trying (no connect per request)
        self.calls = 0  # Redis commands sent (GET, EVALSHA): a hit is one
        self._conn: RespConnection | None = None  # the hot path's connection, opened at the first call
        self._dialing: asyncio.Task | None = None
        self._decoded: dict[str, tuple[bytes, Entry]] = {}
        self._decoded_bytes = 0
        self._model_prefix: dict[str, str] = {}

    async def start(self) -> None:
        from redis.asyncio import Redis


        # The same connections as the counter store (plain, TLS, Unix socket or Sentinel), in a pool of its own.
        connect = self.connect or Connect(connect_timeout_s=self.timeout_s, timeout_s=self.timeout_s)
        self._connect_settings = connect
        pool, self._sentinel = open_pool(parse_url(self.url), connect)
        self._client = Redis(connection_pool=pool)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await redis_dial.close_all(self._dialing, self._conn, self._client, self._sentinel)

    def redis_key(self, model: str, key: str) -> str:
        prefix = self._model_prefix.get(model)
        if prefix is None:  # models are the config's names (or a client's `provider:model`): kept bounded
            if len(self._model_prefix) >= 1024:
                self._model_prefix.clear()
            prefix = self._model_prefix[model] = f"{self.base}{model_part(model)}:"
        return prefix + key

    # --- a hit ------------------------------------------------------------------------------------------

    async def get(self, key: str, model: str = "") -> Entry | None:
        if self._down_until and time.monotonic() < self._down_until:
            return None
        redis_key = self.redis_key(model, key)
        try:
            blob = await self._command("GET", redis_key)
        except (RedisError, ReplyError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            raise
        if blob is None:
            return None
        known = self._decoded.get(redis_key)
        if known is not None and known[0] == blob:  # the same bytes as last time: the same entry, replies and all
            return known[1]
        try:
            entry = Entry.loads(blob)
        except (ValueError, TypeError, struct.error):  # not ours, or cut: a miss, overwritten by the next put
            return None
        self._decoded_bytes += len(blob) + entry.size
        if self._decoded_bytes > _DECODED_BYTES:
            self._decoded.clear()
            self._decoded_bytes = len(blob) + entry.size
        self._decoded[redis_key] = (blob, entry)
        return entry

    async def _command(self, *args):
        self.calls += 1
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        reply = conn.call(*args)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await reply
        except TimeoutError:
            conn.close()  # out of step with the server now: the next call opens another
            raise

    async def _connection(self) -> RespConnection:
        """The connection, opened once for every call that needs it meanwhile."""
        if self._dialing is None:
            target = parse_url(self.url)
            self._dialing = asyncio.get_running_loop().create_task(
                redis_dial.dial(target, self._connect_settings, self._sentinel))
            self._dialing.add_done_callback(self._dialed)
        return await asyncio.shield(self._dialing)

    def _dialed(self, task: asyncio.Task) -> None:
        self._dialing = None
        if not task.cancelled() and task.exception() is None:
            self._conn = task.result()

    # --- a put ------------------------------------------------------------------------------------------

    def keep(self, entry: Entry) -> bool:
        """Sends the entry in the background; False when it is too large or too many puts are on their way."""
        put = self.put(entry)
        if put is None:
            return False
        self.spawn(put)
        return True

    def put(self, entry: Entry):
        """The put of an entry, to await (None when it is too large, too many are on their way, or Redis is
        resting)."""
        blob = entry.dumps()
        if len(blob) > self.max_entry_bytes or len(self._tasks) >= _PENDING_MAX or self.is_down():
            return None
        return self._send(self.redis_key(entry.model, entry.key), blob)

    def spawn(self, work) -> None:
        """Background work on this store (awaited by close())."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def is_down(self) -> bool:
        return bool(self._down_until) and time.monotonic() < self._down_until

    def live_connection(self) -> RespConnection | None:
        """The hot path's connection when it is open (the pieces a leader publishes go on it, in order)."""
        conn = self._conn
        return conn if conn is not None and not conn.closed else None

    async def _send(self, redis_key: str, blob: bytes) -> None:
        try:
            held = await self._script(self._put, [redis_key, self.index, self.sizes, self.total],
                                      [blob, self.ttl_ms, self.max_entries, self.max_bytes])
            self._held = (int(held[0]), int(held[1]))
        except (RedisError, ReplyError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)

    async def _script(self, script: tuple[str, str], keys: list, args: list):
        text, sha = script
        try:
            return await self._command("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not exc.noscript:
                raise
            await self._command("SCRIPT", "LOAD", text)
            return await self._command("EVALSHA", sha, len(keys), *keys, *args)

    @staticmethod
    def script_file(name: str) -> tuple[str, str]:
        return _script(name)  # the module's: a script's text and SHA

    async def command(self, *args):
        return await self._command(*args)

    async def run_script(self, script: tuple[str, str], keys: list, args: list):
        return await self._script(script, keys, args)

    def failed(self, exc: BaseException) -> None:
        self._failed(exc)

    @property
    def connect_settings(self):
        return self._connect_settings

    @property
    def sentinel(self):
        return self._sentinel

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + 1.0
        if now - self._warned > 10.0:
            self._warned = now
            emit(logging.WARNING, "cache_store_unavailable", backend="redis", url=safe_url(self.url),
                 error=type(exc).__name__, message="the Redis cache is unreachable: misses, and nothing stored, "
                                                   "until it answers again (tried again each second)")

    # --- admin ------------------------------------------------------------------------------------------

    async def delete(self, model: str | None = None, key: str | None = None) -> int:
        if model is not None:
            pattern = f"{self.base}{model_part(model)}:{key or '*'}"
        else:
            pattern = f"{self.base}*:{key or '*'}"
        gone = 0
        batch: list[str] = []
        async for found in self._client.scan_iter(match=pattern, count=500):
            name = found.decode() if isinstance(found, bytes) else found
            if name in (self.index, self.sizes, self.total) or name.endswith(":lease") or name.startswith(
                    self._in_flight):  # requests in flight across replicas (coalesce_redis.py): not entries
                continue
            batch.append(name)
            if len(batch) >= 500:
                gone += await self._script(self._forget, [self.index, self.sizes, self.total], batch)
                batch = []
        if batch:
            gone += await self._script(self._forget, [self.index, self.sizes, self.total], batch)
        await self._refresh()
        return int(gone)

    async def _refresh(self) -> None:
        entries = await self._client.zcard(self.index)
        size = await self._client.get(self.total)
        self._held = (int(entries or 0), int(size or 0))

    def held(self) -> tuple[int, int]:
        """(entries, bytes) as the last put or delete of this process saw them."""
        return self._held
