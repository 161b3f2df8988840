"""The Redis store: counters every replica shares, admissions and settlements in one Lua script, `step.lua`.

A request makes two store calls, admission and settlement, whatever the number of policies; when requests
come one at a time that is two round trips each. Under load they share: one script call is on its way at a
time, and everything that reached the store meanwhile (the settlements of requests that ended, summed per
counter, then the admissions of requests that arrived, each all or nothing, in order) goes in the next one.
The bench measures about a quarter of a round trip per request at 16 connections. The answer does not wait
for its settlement (`settle_soon`): it is queued before the answer goes out, so this process's next admission
reaches Redis after it, and a usage read waits for the settlements queued before it.

Why a connection of our own (`policies/stores/resp.py`) and not redis-py on the hot path: redis-py's asyncio
client spent 50-85 us of CPU per EVALSHA here (110 us with a call's arguments), a third of the proxy's whole
request. Here a call is one write of bytes built at once and one bulk-string reply split on spaces.
redis-py still does what is not per request: the probe that finds a Redis that went away, the usage API's
reads and lease renewals. Opening the hot connection (address, TLS, password, database) is a seam of its own,
`dial` (`policies/stores/redis_dial.py` by default), called again after a connection is lost.

The script is sent by SHA-1; on NOSCRIPT (a restarted or flushed server) it is loaded and the call repeated.
Redis's own clock (`TIME` inside the scripts) is the one clock every replica agrees on. A call not answered
within `timeout_s` fails (and its connection, now out of step, is closed).

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
from typing import Awaitable, Callable, Sequence

from redis.exceptions import NoScriptError, RedisError

from policies.stores import redis_dial
from policies.stores.base import BUDGET, GCRA, SLOT, Admission, Claim, Settlement, StoreUnavailable
from policies.stores.redis_connect import Connect, open_pool, parse_url
from policies.stores.resp import ReplyError, RespConnection, encode
from proxy.telemetry.logs import emit


BATCH = 64  # requests per script call at most: one call holds Redis for ~10 us per request


def _time_out(conn: RespConnection, reply: asyncio.Future) -> None:
    """No answer within timeout_s: the call fails, and the connection, now out of step, is closed."""
    if not reply.done():
        reply.set_exception(TimeoutError("redis did not answer in time"))
        conn.close()


def _quiet(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _script(name: str) -> tuple[str, str]:
    text = resources.files("policies.stores").joinpath(name).read_text()
    return text, hashlib.sha1(text.encode()).hexdigest()


def safe_url(url: str) -> str:
    """The URL without its credentials: what the log and /readyz may show."""
    return parse_url(url).display


class RedisStore:
    backend = "redis"

    def __init__(self, url: str, *, timeout_s: float = 1.0, lease_s: float = 30.0, prefix: str = "gp:",
                 max_connections: int = 32, connect: Connect | None = None,
                 dial: Callable[[], Awaitable[RespConnection]] | None = None) -> None:
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
        self.round_trips = 0  # script calls for requests: what the README's round-trip figure is checked against
        self.renewals = 0  # lease renewals done (not counted in round_trips: one per third of a lease, not per request)
        self._client = None  # redis-py: the probe, the usage API's reads, lease renewals (none of them per request)
        self._dial = dial or self._dial_target  # opens the hot path's connection (and opens it again)
        self._conn: RespConnection | None = None  # the hot path's own connection: admissions and settlements
        self._connecting: asyncio.Task | None = None
        self._retry_at = 0.0
        self._step, self._read, self._renew = (_script(n) for n in ("step.lua", "read.lua", "renew.lua"))
        self._evalsha = b"$7\r\nEVALSHA\r\n$40\r\n" + self._step[1].encode() + b"\r\n"
        self._leases: dict[str, str] = {}  # lease id -> slot key, for the slots this process holds
        self._task: asyncio.Task | None = None
        self._admits: list = []  # (claims, future) waiting for the next script call
        self._settles: list = []  # (settlements, future) likewise
        self._soon: asyncio.Future | None = None  # the future settle_soon's settlements queued meanwhile share
        self._in_flight = False  # a script call is on its way: what arrives meanwhile waits for the next
        self._sent = self._landed_calls = 0  # script calls sent, and landed (or failed)
        self._readers: list = []  # (calls landed, future): reads waiting for the settlements queued before them
        self._idle: asyncio.Future | None = None  # set when the last call has landed (close() waits for it)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.replica = uuid.uuid4().hex[:12]

    @property
    def busy(self) -> bool:
        """A call is on its way or requests wait for one."""
        return self._in_flight or bool(self._admits or self._settles)

    async def start(self) -> None:
        from redis.asyncio import Redis

        self._loop = asyncio.get_running_loop()
        # redis-py's bounded pool (policies.stores.redis_connect) for what is not per request; with Sentinel,
        # its sentinels also name the master the hot connection dials.
        pool, self._sentinel = open_pool(parse_url(self.url), self.connect)
        self._client = Redis(connection_pool=pool)
        await self._probe()
        if self.available:
            try:
                self._conn = await self._dial()
            except (OSError, RedisError, ReplyError, TimeoutError):
                self.available, self._retry_at = False, time.monotonic() + 1.0
        if not self.available:
            emit(logging.WARNING, "store_unavailable", backend="redis", url=safe_url(self.url),
                 message="Redis is unreachable at start; serving anyway, each policy follows its on_error")
        self._task = self._loop.create_task(self._keep())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.busy:  # settlements on their way: let them land
            self._idle = self._idle or self._loop.create_future()
            await asyncio.wait([self._idle], timeout=self.timeout_s * 2)
        await redis_dial.close_all(self._connecting, self._conn, self._client, self._sentinel)

    async def _dial_target(self) -> RespConnection:
        return await redis_dial.dial(parse_url(self.url), self.connect, self._sentinel)

    def status(self) -> dict:
        return {"backend": "redis", "status": "ok" if self.available else "unavailable", "url": safe_url(self.url)}

    # --- admissions and settlements: one script call at a time, carrying every request that waits ------

    def admit(self, claims: Sequence[Claim]) -> asyncio.Future:
        return self._queue(self._admits, claims)

    def settle(self, settlements: Sequence[Settlement]) -> asyncio.Future:
        return self._queue(self._settles, settlements)

    def settle_soon(self, settlements: Sequence[Settlement]) -> asyncio.Future:
        """`settle` for a caller that does not wait: the future only says, when done, whether it landed. The
        settlements queued for one call share one future: nobody waits on it, so one per request is waste."""
        soon = self._soon
        if soon is None or soon.done():
            soon = self._soon = self._queue(self._settles, settlements)
            return soon
        return self._queue(self._settles, settlements, soon)

    def _queue(self, pending: list, item, future: asyncio.Future | None = None) -> asyncio.Future:
        """While a call is on its way, the requests that come meanwhile wait and go together in the next one
        (admissions up to `BATCH` a call, and every settlement). A lone request goes at the end of the loop's
        current turn, with whatever else arrived in it."""
        if not self.available and time.monotonic() < self._retry_at:
            raise StoreUnavailable("redis is unreachable")
        loop = self._loop
        if future is None:
            future = loop.create_future()
        pending.append((item, future))
        if not self._in_flight:
            self._in_flight = True
            loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            if self._connecting is None:
                self._connecting = self._loop.create_task(self._reconnect())
            return
        self._sent += 1
        admits, settles = self._admits[:BATCH], self._settles[:BATCH * 4]
        del self._admits[:BATCH], self._settles[:BATCH * 4]
        self._soon = None  # settle_soon's next settlements share a future of their own
        try:
            command = self._step_command(admits, settles)
            self.round_trips += 1
            self._eval(conn, command, admits, settles, retried=False)
        except BaseException as exc:  # nothing may wait forever
            self._landed_badly(admits, settles, exc)
            self._next()

    def _eval(self, conn: RespConnection, command: bytes, admits: list, settles: list, retried: bool) -> None:
        reply = conn.send(command)
        timer = self._loop.call_later(self.timeout_s, _time_out, conn, reply)
        reply.add_done_callback(lambda r: self._landed(conn, r, timer, command, admits, settles, retried))

    async def _reconnect(self) -> None:
        """A lost connection is opened again by the next call; while Redis is known down, not even tried."""
        try:
            if not self.available and time.monotonic() < self._retry_at:
                raise ConnectionError("redis is unreachable")
            self._conn = await self._dial()
        except (OSError, RedisError, ReplyError, TimeoutError) as exc:
            self._down(exc)
            self._sent += 1  # the batch dropped counts as a call, for the reads waiting on it
            admits, settles = self._admits[:], self._settles[:]
            del self._admits[:], self._settles[:]
            self._landed_badly(admits, settles, exc)
        except BaseException as exc:  # cancelled by close(): nobody may wait forever
            admits, settles = self._admits[:], self._settles[:]
            del self._admits[:], self._settles[:]
            self._landed_badly(admits, settles, exc)
            raise
        finally:
            self._connecting = None
        if self._admits or self._settles:
            self._send()
        else:
            self._next()

    def _step_command(self, admits: list, settles: list) -> bytes:
        """EVALSHA step.lua: the settled counters, summed per key, then each admission's claims in order."""
        prefix = self.prefix
        keys: list[bytes] = []
        sums: dict[str, list] = {}
        leases = self._leases
        for settlements, _ in settles:
            for s in settlements:
                kind = s.kind
                if kind == SLOT:
                    leases.pop(s.lease, None)
                held = sums.get(s.key)
                if held is None:
                    sums[s.key] = ([kind, s.used - s.reserved, s.limit, s.param] if kind == GCRA else
                                   [kind, s.reserved, s.used] if kind == BUDGET else [kind, [s.lease]])
                elif kind == GCRA:
                    held[1] += s.used - s.reserved
                elif kind == BUDGET:
                    held[1] += s.reserved
                    held[2] += s.used
                else:
                    held[1].append(s.lease)
        settled = []
        for key, held in sums.items():
            keys.append((prefix + key).encode())
            kind = held[0]
            if kind == GCRA:
                settled.append("g %d %d %r" % (held[1], held[2], held[3]))
            elif kind == BUDGET:
                settled.append("b %d %d" % (held[1], held[2]))
            else:
                settled.append("s %d %s" % (len(held[1]), " ".join(held[1])))
        words = [str(len(admits))]
        lease_s = self.lease_s
        for claims, _ in admits:
            words.append(str(len(claims)))
            for c in claims:
                keys.append((prefix + c.key).encode())
                words.append("%s %d %d %r %d %s" % (c.kind, c.limit, c.amount, lease_s if c.kind == SLOT else c.param,
                                                    c.soft, c.lease or "-"))
        args = [" ".join(settled).encode(), " ".join(words).encode()]
        out = [b"*%d\r\n" % (5 + len(keys)), self._evalsha, b"$%d\r\n%d\r\n" % (len(str(len(keys))), len(keys))]
        for arg in keys:
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        for arg in args:
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(out)

    def _landed(self, conn: RespConnection, reply: asyncio.Future, timer: asyncio.TimerHandle, command: bytes,
                admits: list, settles: list, retried: bool) -> None:
        timer.cancel()
        try:
            exc = reply.exception()
            if exc is not None:
                if isinstance(exc, ReplyError) and exc.noscript and not retried:
                    # A restarted or flushed Redis: load the script and call again, both in one write's time.
                    conn.send(encode(b"SCRIPT", b"LOAD", self._step[0])).add_done_callback(_quiet)
                    self._eval(conn, command, admits, settles, retried=True)
                    return
                if isinstance(exc, ReplyError):  # a script error: the connection is fine, the call failed
                    emit(logging.ERROR, "store_error", backend="redis", error=str(exc)[:200])
                    self._landed_badly(admits, settles, exc)
                else:
                    self._down(exc)
                    self._landed_badly(admits, settles, exc)
            else:
                if not self.available:
                    self._up()
                self._admitted(admits, reply.result())
                for _, future in settles:
                    if not future.done():
                        future.set_result(None)
        except BaseException as exc:  # whatever went wrong, no request may wait forever
            self._landed_badly(admits, settles, exc)
        self._next()

    def _next(self) -> None:
        """The next call with whatever arrived meanwhile, or nothing on the way any more."""
        self._landed_calls += 1
        if self._readers:
            idle = not (self._admits or self._settles)
            waiting = []
            for landed, future in self._readers:
                if idle or landed <= self._landed_calls:
                    if not future.done():
                        future.set_result(None)
                else:
                    waiting.append((landed, future))
            self._readers = waiting
        if self._admits or self._settles:
            self._send()
            return
        self._in_flight = False
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _admitted(self, admits: list, result: bytes) -> None:
        prefix = self.prefix
        for (claims, future), line in zip(admits, result.split(b"\n")):
            words = line.split()
            ok = words[0] == b"1"
            if future.done():  # the request was cancelled (its client left) while its claims were on the way
                if ok:
                    self._give_back(claims)
                continue
            if ok:
                for c in claims:
                    if c.kind == SLOT:
                        self._leases[c.lease] = prefix + c.key
            n, nover = len(claims), int(words[3])
            at = 4 + nover
            future.set_result(Admission(ok, int(words[1]), float(words[2]), tuple(int(i) for i in words[4:at]),
                                        [float(r) for r in words[at:at + n]],
                                        [float(r) for r in words[at + n:at + 2 * n]]))

    def _landed_badly(self, admits: list, settles: list, exc: BaseException) -> None:
        error = StoreUnavailable("redis is unreachable" if not isinstance(exc, ReplyError) else str(exc)[:200])
        for _, future in admits:
            if not future.done():
                future.set_exception(error)
        for _, future in settles:
            if not future.done():
                future.set_exception(error)

    def _give_back(self, claims: Sequence[Claim]) -> None:
        """Returns what an admission took for a request that is no longer there to settle it."""
        back = [Settlement(c.kind, c.key, reserved=c.amount, used=0, limit=c.limit, param=c.param, lease=c.lease)
                for c in claims if not (c.kind == GCRA and c.header == "requests")]
        if back:
            try:
                future = self._queue(self._settles, back)
            except StoreUnavailable:
                return
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure is logged by the store

    async def read(self, claims: Sequence[Claim]) -> list[tuple[float, float]]:
        if self._in_flight:  # settlements are on their way or queued (an answer does not wait for them): after them
            future = self._loop.create_future()
            self._readers.append((self._sent + (1 if self._admits or self._settles else 0), future))
            await future
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
        return await self._guarded(lambda: getattr(self._client, method)(*args, **kwargs))

    # --- calls, failures, recovery ----------------------------------------------------------------------

    async def _call(self, script: tuple[str, str], keys: list, args: list):
        text, sha = script

        async def evalsha():
            try:
                return await self._client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._client.script_load(text)
                return await self._client.evalsha(sha, len(keys), *keys, *args)

        return await self._guarded(evalsha)

    async def _guarded(self, call: Callable[[], Awaitable]):
        """One redis-py call off the hot path: refused for a second after a failure, marks the store down on one
        and up again on a success."""
        if not self.available and time.monotonic() < self._retry_at:
            raise StoreUnavailable("redis is unreachable")
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            self._down(exc)
            raise StoreUnavailable("redis is unreachable") from None
        if not self.available:
            self._up()
        return result

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
