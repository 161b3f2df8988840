"""The Redis store: counters every replica shares, each operation one Lua script called by its hash.

A request costs two round trips, whatever the number of policies: `admit` at admission (every limit and
budget that applies, checked and reserved in one script) and `settle` at the end. redis-py's asyncio client
spends 50-85 us of CPU per EVALSHA here (more with many arguments), about a third of what the proxy spends
on a whole request, so a round trip per policy would have cost more than the policies themselves. Requests
that reach the store together share one call (the script handles each request
all or nothing, one after the other): while one call is on its way the next requests queue and go
together, and a call's claims travel as one argument, so under load a request's share of the Redis
client's CPU is a fraction of one EVALSHA.

The scripts are sent by SHA-1; on NOSCRIPT (a restarted or flushed server) the script is loaded and the
call repeated. Redis's own clock (`TIME` inside the scripts) is the one clock every replica agrees on.

When Redis cannot be reached every call raises `StoreUnavailable` at once (no queueing, no retries: each
policy's `on_error` decides), the log says so once, and a background probe brings the store back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from importlib import resources
from typing import Sequence

from redis.exceptions import NoScriptError, RedisError, ResponseError

from policies.stores.base import GCRA, SLOT, Admission, Claim, Settlement, StoreUnavailable
from policies.stores.redis_connect import Connect, open_pool, parse_url
from proxy.telemetry.logs import emit


BATCH = 64  # requests per script call at most: one call holds Redis for ~10 us per request


def _fail(batch: list, exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(StoreUnavailable(str(exc)))


def _script(name: str) -> tuple[str, str]:
    text = resources.files("policies.stores").joinpath(name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


def safe_url(url: str) -> str:
    """The URL without its credentials: what the log and /readyz may show."""
    return parse_url(url).display


class RedisStore:
    backend = "redis"

    def __init__(self, url: str, *, timeout_s: float = 1.0, lease_s: float = 30.0, prefix: str = "gp:",
                 max_connections: int = 32, connect: Connect | None = None) -> None:
        self.url = url
        # The connection settings ([store] connect_timeout_s, timeout_s, pool_size, tls_*); from the
        # arguments when not given (the tests' short form).
        self.connect = connect or Connect(connect_timeout_s=timeout_s, timeout_s=timeout_s, pool_size=max_connections)
        self._sentinel = None
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.prefix = prefix
        self.available = False
        self.round_trips = 0  # EVALSHA calls made: what the README's "two per request" is checked against
        self.renewals = 0  # lease renewals done (not counted in round_trips: one per third of a lease, not per request)
        self._client = None
        self._retry_at = 0.0
        self._admit, self._settle, self._read, self._renew = (_script(n) for n in
                                                               ("admit.lua", "settle.lua", "read.lua", "renew.lua"))
        self._leases: dict[str, str] = {}  # lease id -> slot key, for the slots this process holds
        self._task: asyncio.Task | None = None
        self._admits: list = []  # (claims, future) waiting for the next script call
        self._settles: list = []
        self._sending: set = set()
        self._busy: set = set()  # the kinds (admit, settle) with a call on its way
        self.replica = uuid.uuid4().hex[:12]

    async def start(self) -> None:
        from redis.asyncio import Redis

        # A bounded pool (policies.stores.redis_connect): a burst of requests shares a few connections (one
        # script call takes ~0.1 ms of Redis) instead of opening one each.
        pool, self._sentinel = open_pool(parse_url(self.url), self.connect)
        self._client = Redis(connection_pool=pool)
        await self._probe()
        if not self.available:
            emit(logging.WARNING, "store_unavailable", backend="redis", url=safe_url(self.url),
                 message="Redis is unreachable at start; serving anyway, each policy follows its on_error")
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sending:  # settlements on their way: let them land
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            await self._client.connection_pool.disconnect()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    def status(self) -> dict:
        return {"backend": "redis", "status": "ok" if self.available else "unavailable", "url": safe_url(self.url)}

    # --- the three operations ---------------------------------------------------------------------------

    async def admit(self, claims: Sequence[Claim]) -> Admission:
        return await self._queue(self._admits, claims, self._send_admits)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        await self._queue(self._settles, settlements, self._send_settles)

    def _queue(self, pending: list, item, send) -> asyncio.Future:
        """Batches: while a call of this kind is on its way, the requests that come meanwhile wait and go
        together in the next one (up to `BATCH` a call). Under load a batch grows with the round trip; a
        lone request goes at once."""
        if not self.available and time.monotonic() < self._retry_at:
            raise StoreUnavailable("redis is unreachable")
        future = asyncio.get_running_loop().create_future()
        pending.append((item, future))
        if send not in self._busy:
            self._busy.add(send)
            task = asyncio.ensure_future(self._drain(pending, send))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return future

    async def _drain(self, pending: list, send) -> None:
        try:
            while pending:
                batch = pending[:BATCH]
                del pending[:BATCH]
                try:
                    await send(batch)
                except BaseException as exc:  # whatever went wrong, no request may wait forever
                    _fail(batch, exc)
                    if isinstance(exc, asyncio.CancelledError):
                        _fail(pending, exc)
                        pending.clear()
                        raise
                    emit(logging.ERROR, "store_error", backend="redis", error=type(exc).__name__)
        finally:
            self._busy.discard(send)

    async def _send_admits(self, batch: list) -> None:
        keys, words = [], [str(len(batch))]
        prefix = self.prefix
        for claims, _ in batch:
            words.append(str(len(claims)))
            for c in claims:
                keys.append(prefix + c.key)
                param = self.lease_s if c.kind == SLOT else c.param
                words += (c.kind, str(c.limit), str(c.amount), repr(param), "1" if c.soft else "0", c.lease or "-")
        try:
            results = await self._call(self._admit, keys, [" ".join(words)])
        except StoreUnavailable as exc:
            _fail(batch, exc)
            return
        for (claims, future), (ok, failed, retry, over, remaining, reset) in zip(batch, results):
            if future.done():  # the request was cancelled (its client left) while its claims were on the way
                if ok:
                    self._give_back(claims)
                continue
            if ok:
                for c in claims:
                    if c.kind == SLOT:
                        self._leases[c.lease] = prefix + c.key
            future.set_result(Admission(bool(ok), int(failed), float(retry), tuple(int(i) for i in over),
                                        [float(r) for r in remaining], [float(r) for r in reset]))

    def _give_back(self, claims: Sequence[Claim]) -> None:
        """Returns what an admission took for a request that is no longer there to settle it."""
        back = [Settlement(c.kind, c.key, reserved=c.amount, used=0, limit=c.limit, param=c.param, lease=c.lease)
                for c in claims if not (c.kind == GCRA and c.header == "requests")]
        if back:
            future = self._queue(self._settles, back, self._send_settles)
            future.add_done_callback(lambda f: f.exception())  # a failure here is already logged by the store

    async def _send_settles(self, batch: list) -> None:
        keys, words = [], []
        prefix = self.prefix
        for settlements, _ in batch:
            for s in settlements:
                keys.append(prefix + s.key)
                words += (s.kind, str(s.reserved), str(s.used), str(s.limit), repr(s.param), s.lease or "-")
                if s.kind == SLOT:
                    self._leases.pop(s.lease, None)
        try:
            await self._call(self._settle, keys, [" ".join(words)])
        except StoreUnavailable as exc:
            _fail(batch, exc)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def read(self, claims: Sequence[Claim]) -> list[tuple[float, float]]:
        keys, args = [], []
        for c in claims:
            keys.append(self.prefix + c.key)
            args += (c.kind, c.limit, repr(c.param))
        rows = await self._call(self._read, keys, args)
        return [(float(u), float(r)) for u, r in rows]

    async def changed(self, timeout: float) -> None:
        # A slot freed by another replica sends no signal: a queued request looks again after a short pause.
        await asyncio.sleep(min(timeout, 0.025))

    # --- owners (base.Owners): off the hot path, so plain commands, no script ------------------------------

    async def set_owner(self, name: str, owner: str, ttl_s: float) -> None:
        await self._command("set", self.prefix + "own:" + name, owner, px=max(1, int(ttl_s * 1000)))

    async def owners(self, names: Sequence[str]) -> list[str | None]:
        if not names:
            return []
        found = await self._command("mget", [self.prefix + "own:" + name for name in names])
        return [None if value is None else value.decode() for value in found]

    async def drop_owner(self, name: str) -> None:
        await self._command("delete", self.prefix + "own:" + name)

    async def _command(self, method: str, *args, **kwargs):
        if not self.available and time.monotonic() < self._retry_at:
            raise StoreUnavailable("redis is unreachable")
        try:
            result = await getattr(self._client, method)(*args, **kwargs)
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise StoreUnavailable("redis is unreachable") from None
        if not self.available:
            self._up()
        return result

    # --- calls, failures, recovery ----------------------------------------------------------------------

    async def _call(self, script: tuple[str, str], keys: list, args: list):
        if not self.available and time.monotonic() < self._retry_at:
            raise StoreUnavailable("redis is unreachable")
        text, sha = script
        try:
            self.round_trips += 1
            try:
                result = await self._evalsha(sha, keys, args)
            except NoScriptError:
                await self._client.script_load(text)
                result = await self._evalsha(sha, keys, args)
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise StoreUnavailable("redis is unreachable") from None
        if not self.available:
            self._up()
        return result

    async def _evalsha(self, sha: str, keys: list, args: list):
        """EVALSHA on a pooled connection of redis-py, without its command layer (retries, hooks, response
        callbacks): 48 us of CPU a call instead of 110 here. Connecting, AUTH, SELECT and TLS stay redis-py's."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(connection.pack_command("EVALSHA", sha, len(keys), *keys, *args),
                                                 check_health=False)
            return await connection.read_response()
        except ResponseError:  # an answer (NOSCRIPT, a script error): the connection is fine
            raise
        except BaseException:  # a timeout or a cancellation mid-answer leaves the connection out of step
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    def _down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + 1.0
        if self.available:
            self.available = False
            emit(logging.WARNING, "store_unavailable", backend="redis", url=safe_url(self.url),
                 error=type(exc).__name__, message="Redis is unreachable; each policy follows its on_error")

    def _up(self) -> None:
        self.available = True
        emit(logging.INFO, "store_recovered", backend="redis", url=safe_url(self.url))

    async def _probe(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            self._down(exc)
            return
        if self._task is None:  # at start: nothing to recover from
            self.available = True
        elif not self.available:
            self._up()

    async def _keep(self) -> None:
        """Renews this replica's slot leases every third of a lease, and probes a Redis that went away."""
        renew_every = self.lease_s / 3
        next_renew = time.monotonic() + renew_every
        while True:
            await asyncio.sleep(1.0 if not self.available else min(1.0, renew_every))
            if not self.available:
                await self._probe()
                continue
            if time.monotonic() >= next_renew and self._leases:
                next_renew = time.monotonic() + renew_every
                held = list(self._leases.items())
                args = (len(held), *(k for _, k in held), self.lease_s, *(lease for lease, _ in held))
                try:
                    try:
                        await self._client.evalsha(self._renew[1], *args)
                    except NoScriptError:
                        await self._client.script_load(self._renew[0])
                        await self._client.evalsha(self._renew[1], *args)
                    self.renewals += 1
                except (RedisError, OSError) as exc:
                    self._down(exc)
