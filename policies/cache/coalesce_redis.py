"""Identical requests in flight on different replicas share one upstream call, through Redis.

Within a process, requests of one key follow a `Capture` (policies/cache/coalesce.py). Across replicas this
module adds one Redis step to a miss that finds no flight of its key in its own process: `flight_lead.lua`
(one round trip, after the GET that missed) either

- gives it the key's lease (`SET NX PX`, 3 s, renewed each second while its upstream call runs): it leads,
  and its capture is published to a Redis Stream only if another replica follows it; or
- tells it another request holds the lease: it follows, through a relay that reads that request's stream
  (`XREAD BLOCK` on a connection of its own) and feeds a capture in this process, which every request of
  the key here follows as it would a local leader (one Redis reader per key per replica, and at most
  `relays_max` of them: past that, the miss leads in this process, and its holder is not told); or
- says the entry is there now (stored since the GET): the request looks it up again.

Publishing costs nothing when nobody follows: a follower adds the lease to its holder's "followed" set and
publishes its name on the channel of that name (in the same script). The holder subscribes to its channel
(one connection a process, opened at its first miss), and pops its set each second while it leads, should a
message be lost (its subscription was down); from then on it appends what it captured
and each piece that comes after to its stream (XADD, bounded by MAXLEN and a TTL; the first piece names the
model, which a streaming follower's headers need long before the end), and ends it with a
marker: `done` (a whole answer), `failed` (none: the followers go upstream themselves, one of them taking the
lease) or `alone` (it cannot be followed: the followers go upstream without the lease). `flight_end.lua`
frees the lease after the answer's put, so a request that finds the lease free finds the entry stored.

Every wait is bounded. A relay gives up on a leader that sent nothing for `coalesce_wait_s` (its followers
then go upstream on their own), and on one whose lease is gone without an end marker (its replica died, or
lost Redis): followers that have sent nothing go upstream; live streams end with an error event, as for a
local leader whose stream broke. When Redis cannot be reached, a miss leads in its process, and in-process
coalescing goes on as without Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from policies.cache.coalesce import DOWN, FOLLOW, LEAD, STORED  # defined where the policy reads them
from policies.stores import redis_dial
from policies.stores.redis_connect import parse_url
from policies.stores.resp import ReplyError, RespConnection
from proxy.telemetry.logs import emit

if TYPE_CHECKING:
    from policies.cache.coalesce import Capture
    from policies.cache.store_redis import RedisCache

LEASE_MS = 3000  # a leader that stops renewing (its process died) is given up on after this
_TICK_S = 1.0  # how often a replica that leads pops its followed set (messages tell it at once)
_STREAM_TTL_MS = 10_000  # a published stream's life, renewed with the lease; kept this long after its end
_STREAM_MAXLEN = 100_000  # pieces of one answer at most (an answer larger than max_entry_bytes still streams)
_HELD_MAX_S = 600.0  # no lease is renewed, nor followed, longer than this (a leader that never ended)
_BLOCK_S = 1.0  # one XREAD BLOCK at most; after a silent one the relay checks the leader's lease
_RESUBSCRIBE_S = 10.0  # after a subscription failed, the next is asked for no sooner than this
_IDLE_READERS = 4  # relay connections kept for the next relay (within the bound on relays)
_RELAYS_MAX = 32  # keys of other replicas a replica follows at once, with no [store] pool_size to go by
_FAILURES = (RedisError, ReplyError, OSError, asyncio.TimeoutError)


def _drop(future: asyncio.Future) -> None:
    """A publish nobody awaits: its failure shows as a lost connection (the lease is then given up)."""
    if not future.cancelled():
        future.exception()


class Lease:
    """A leader's hold on its key across replicas, kept on its capture."""

    __slots__ = ("key", "token", "stream", "until", "published", "ending", "broken", "lost", "conn")

    def __init__(self, key: str, token: str, stream: str, until: float) -> None:
        self.key, self.token, self.stream = key, token, stream
        self.until = until  # renewed until then at most
        self.published = False  # a replica follows: every piece goes to the stream
        self.ending = False  # the end script was sent
        self.broken = False  # a publish could not go out on the connection the others went on
        self.lost = False  # the lease expired under it
        self.conn: RespConnection | None = None


class SharedFlights:
    """The cross-replica side of one cache policy's coalescing, on its Redis store's connections."""

    def __init__(self, store: "RedisCache", wait_s: float, held_max_s: float = _HELD_MAX_S) -> None:
        self.store = store
        self.wait_s = wait_s
        self.held_max_s = held_max_s  # _HELD_MAX_S; a test gives a short one
        # A relay holds a Redis connection of its own while it follows a key: this replica follows at most
        # [store] pool_size keys at once (the connections the operator allows a process), and a miss past that
        # goes upstream itself, as it would without coalescing (a wait in line would add latency to a request
        # whose replica is already this busy; the bound bites only with that many distinct keys in flight).
        connect = store.connect
        self.relays_max = connect.pool_size if connect is not None else _RELAYS_MAX
        self.relaying = 0  # relays running, or asked for (their lease script on its way)
        self.relays_full = 0  # misses that could have followed another replica's request but for the bound
        self.replica = os.urandom(6).hex()
        self._numbers = itertools.count(1)
        self.followed = f"{store.base}followed:{self.replica}"
        self._lead, self._renew, self._end = (store.script_file(n) for n in
                                              ("flight_lead.lua", "flight_renew.lua", "flight_end.lua"))
        self.leases: dict[str, "Capture"] = {}  # lease key -> the capture leading it
        self._ticking: asyncio.Task | None = None
        self._relays: set[asyncio.Task] = set()
        self._idle: list[RespConnection] = []
        self._subscriber: RespConnection | None = None
        self._subscribing: asyncio.Task | None = None
        self._subscribe_after = 0.0  # a subscription that failed (Redis down, or no channels for its user)
        self._warned = 0.0

    async def close(self) -> None:
        # A leader whose client left mid-stream reads on for other replicas' followers with no request of its
        # own holding its config generation: a reload waits for its end (within its attempt's timeout_s), and
        # for the lease's end after it, before the lease stops being renewed.
        kept = [asyncio.ensure_future(c.wait_end()) for c in self.leases.values() if c.handed and not c.ended]
        if kept:
            await asyncio.wait(kept, timeout=self.held_max_s)
            for waiting in kept:
                waiting.cancel()
        tasks = [t for t in (self._ticking, self._subscribing, *self._relays) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        if self._subscriber is not None:
            self._subscriber.close()

    # --- a miss -----------------------------------------------------------------------------------------

    async def claim(self, capture: "Capture", stale: bool = False) -> str:
        """LEAD (the capture leads, with a lease), FOLLOW (a relay feeds it from another replica's stream),
        STORED (the entry is there now: not asked when the caller found it `stale`, too old for its max-age), or
        DOWN (Redis unreachable, or another replica's request holds the lease while this replica follows
        `relays_max` keys already: it leads in this process only)."""
        store = self.store
        if store.is_down():
            return DOWN
        if ((self._subscriber is None or self._subscriber.closed) and self._subscribing is None
                and time.monotonic() >= self._subscribe_after):
            self._subscribing = asyncio.get_running_loop().create_task(self._subscribe())
        entry_key = store.redis_key(capture.model, capture.key)
        lease_key = entry_key + ":lease"
        token = f"{self.replica}:{next(self._numbers)}"
        may_follow = self.relaying < self.relays_max
        self.relaying += may_follow  # a place kept for its relay while the script runs
        try:
            reply = await store.run_script(self._lead, [entry_key, lease_key],
                                           [token, LEASE_MS, f"{store.base}followed:", LEASE_MS * 2,
                                            0 if stale else 1, 1 if may_follow else 0])
        except _FAILURES as exc:
            self.relaying -= may_follow
            store.failed(exc)
            return DOWN
        except asyncio.CancelledError:
            self.relaying -= may_follow
            # Its client left: the script may still take the lease. The end goes on the same connection,
            # after it: the lease is freed, and anyone who followed it meanwhile goes upstream at once.
            self.store.spawn(self._abandon(lease_key, token))
            raise
        if reply[0] != 2:
            self.relaying -= may_follow
        if reply[0] == 3:
            self.relays_full += 1
            self._gave_up(capture, b"alone", "relays_full")
            return DOWN
        if reply[0] == 1:
            until = asyncio.get_running_loop().time() + self.held_max_s
            capture.lease = Lease(lease_key, token, self.stream_of(token), until)
            self.leases[lease_key] = capture
            if self._ticking is None:
                self._ticking = asyncio.get_running_loop().create_task(self._tick())
            return LEAD
        if reply[0] == 0:
            return STORED
        holder = reply[1].decode()
        capture.relay = True
        task = asyncio.get_running_loop().create_task(self._relay(capture, lease_key, holder))
        self._relays.add(task)
        task.add_done_callback(self._relay_done)
        return FOLLOW

    def _relay_done(self, task: asyncio.Task) -> None:
        self._relays.discard(task)
        self.relaying -= 1

    def stream_of(self, token: str) -> str:
        return f"{self.store.base}flight:{token}"

    # --- the leader's side ------------------------------------------------------------------------------

    def publish(self, lease: Lease, field: str, data: bytes, model: str = "") -> None:
        """Appends one piece to the stream, on the connection every piece of this answer went on (pieces that
        would go on another could leave a gap: the lease is given up instead). The first piece of a stream
        names the model (`m`): a streaming follower's headers leave with it, long before the end marker."""
        conn = self.store.live_connection()
        if lease.broken or conn is None or (lease.conn is not None and conn is not lease.conn):
            lease.broken = True
            return
        if lease.conn is None and model:
            conn.call("XADD", lease.stream, "MAXLEN", "~", _STREAM_MAXLEN, "*", field, data, "m",
                      model).add_done_callback(_drop)
        else:
            conn.call("XADD", lease.stream, "MAXLEN", "~", _STREAM_MAXLEN, "*", field, data).add_done_callback(_drop)
        lease.conn = conn

    def _followed(self, capture: "Capture") -> None:
        """Another replica follows this leader: what it captured so far goes out, and each piece after it."""
        lease = capture.lease
        if lease.published:
            return
        lease.published = True
        capture.followers += 1  # as a local follower, it keeps what was captured until the end
        if capture.too_big and not capture.events and capture.size:  # dropped already: it cannot be replayed
            self._mark(lease, b"alone", "")
            return
        if capture.plain is not None:
            self.publish(lease, "p", capture.plain)
        elif capture.events:
            self.publish(lease, "d", b"".join(capture.events), capture.answered_by)
        if lease.conn is not None:
            lease.conn.call("PEXPIRE", lease.stream, _STREAM_TTL_MS).add_done_callback(_drop)
        if lease.ending:  # the end script ran before this was known: the marker goes out here
            self._mark(lease, b"done" if capture.whole and not lease.broken else b"failed", capture.answered_by)

    def _mark(self, lease: Lease, marker: bytes, model: str) -> None:
        conn = lease.conn or self.store.live_connection()
        if conn is not None:
            conn.call("XADD", lease.stream, "MAXLEN", "~", _STREAM_MAXLEN, "*", "e", marker, "m",
                      model).add_done_callback(_drop)
            conn.call("PEXPIRE", lease.stream, _STREAM_TTL_MS).add_done_callback(_drop)

    def end(self, capture: "Capture", put) -> None:
        """The leader's call is over: the entry's put (when there is one), then the stream's end and the
        lease freed, in that order, so whoever finds the lease free finds the entry."""
        self.store.spawn(self._ending(capture, put))

    async def _ending(self, capture: "Capture", put) -> None:
        lease = capture.lease
        try:
            if put is not None:
                await put
            marker = b"done" if capture.whole and not lease.broken else b"failed"  # a gap is no answer
            for _ in range(2):
                lease.ending = True
                published = lease.published
                again = await self.store.run_script(
                    self._end, [lease.key, lease.stream, self.followed],
                    [lease.token, 1 if published else 0, marker, capture.answered_by, _STREAM_TTL_MS,
                     _STREAM_MAXLEN])
                if not again:
                    break
                lease.ending = False
                self._followed(capture)  # a follower joined since the last look: publish, then end again
        except _FAILURES as exc:
            self.store.failed(exc)
        finally:
            # Only its own: a lease held past held_max_s expired, and the key's next lease may be this replica's.
            if self.leases.get(lease.key) is capture:
                del self.leases[lease.key]

    async def _abandon(self, lease_key: str, token: str) -> None:
        try:
            await self.store.run_script(self._end, [lease_key, self.stream_of(token), self.followed],
                                        [token, 1, b"failed", "", _STREAM_TTL_MS, _STREAM_MAXLEN])
        except _FAILURES as exc:
            self.store.failed(exc)

    async def _subscribe(self) -> None:
        """The connection on which this replica hears, at once, that another follows one of its leaders."""
        store = self.store
        try:
            conn = await redis_dial.dial(parse_url(store.url), store.connect_settings, store.sentinel)
            conn.on_push = self._pushed
            try:
                async with asyncio.timeout(store.timeout_s):
                    await conn.call("SUBSCRIBE", self.followed)
            except BaseException:
                conn.close()
                raise
            self._subscriber = conn
        except _FAILURES:
            # The set is popped each second meanwhile; a later miss tries again, not every one.
            self._subscribe_after = time.monotonic() + _RESUBSCRIBE_S
        finally:
            self._subscribing = None

    def _pushed(self, message) -> None:
        if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
            capture = self.leases.get(message[2].decode(errors="replace"))
            if capture is not None:
                self._followed(capture)

    async def _tick(self) -> None:
        """While this replica leads: its leases renewed, and its followed set popped, every second."""
        try:
            while self.leases:
                await asyncio.sleep(_TICK_S)
                if self.store.is_down() or not self.leases:
                    continue
                try:
                    popped = await self.store.command("SPOP", self.followed, 1000)
                    for name in popped or ():
                        capture = self.leases.get(name.decode())
                        if capture is not None:
                            self._followed(capture)
                    await self._renew_all()
                except _FAILURES as exc:
                    self.store.failed(exc)
        finally:
            self._ticking = None

    async def _renew_all(self) -> None:
        now = asyncio.get_running_loop().time()
        for name in [k for k, c in self.leases.items() if c.lease.until <= now]:
            del self.leases[name]  # never ended: left to expire
        held = [c.lease for c in self.leases.values() if not (c.lease.lost or c.lease.broken or c.lease.ending)]
        if not held:
            return
        keys = [k for lease in held for k in (lease.key, lease.stream)]
        lost = await self.store.run_script(self._renew, keys,
                                           [LEASE_MS, _STREAM_TTL_MS, *(lease.token for lease in held)])
        for name in lost or ():
            capture = self.leases.get(name.decode())
            if capture is not None:
                capture.lease.lost = True

    # --- the follower's side ----------------------------------------------------------------------------

    async def _relay(self, capture: "Capture", lease_key: str, holder: str) -> None:
        """Feeds `capture` from the holder's stream until its end marker, a lease gone, or `wait_s` without
        a first piece; then ends the capture, as the pipeline ends a local leader's."""
        loop = asyncio.get_running_loop()
        stream, token = self.stream_of(holder), holder.encode()
        deadline = loop.time() + self.wait_s
        give_up = loop.time() + self.held_max_s
        last, got, final, marker = b"0", False, False, None
        conn: RespConnection | None = None
        pending = False  # an XREAD is on its way: the connection cannot be used again
        try:
            conn = await self._reader()
            while marker is None:
                if final:
                    args = ("XREAD", "COUNT", 1000, "STREAMS", stream, last)
                    block = 0.0
                else:
                    block = min(_BLOCK_S, (give_up if got else deadline) - loop.time())
                    if block <= 0 and got:
                        marker = self._gave_up(capture, b"failed", "held_too_long")
                        break
                    if block <= 0:  # nothing within coalesce_wait_s: go upstream on our own
                        marker = self._gave_up(capture, b"alone", "coalesce_wait_s")
                        break
                    args = ("XREAD", "COUNT", 1000, "BLOCK", max(1, int(block * 1000)), "STREAMS", stream, last)
                pending = True
                async with asyncio.timeout(block + self.store.timeout_s):
                    reply = await conn.call(*args)
                pending = False
                if reply:
                    for entry_id, fields in reply[0][1]:
                        last = entry_id
                        field, value = fields[0], fields[1]
                        if field == b"d":
                            if len(fields) > 3 and not capture.answered_by:  # the first piece names the model
                                capture.answered_by = fields[3].decode()
                            capture.stream(value)
                            got = True
                        elif field == b"p":
                            capture.body(value)
                            got = True
                        elif field == b"e":
                            marker = value
                            capture.answered_by = fields[3].decode() if len(fields) > 3 else ""
                            break
                    continue
                if final:  # the lease is gone and no end came: the leader died or lost Redis
                    marker = self._gave_up(capture, b"failed", "leader_lost")
                    break
                if await self.store.command("GET", lease_key) != token:
                    final = True  # one last look: its end may have landed just before the lease went
        except _FAILURES as exc:
            self.store.failed(exc)
            marker = b"alone"  # Redis failed us: this replica's followers go upstream (coalesced here)
        finally:
            if conn is not None:
                if pending:
                    conn.close()
                else:
                    self._give_back(conn)
            self._landed(capture, marker or b"alone")

    def _gave_up(self, capture: "Capture", marker: bytes, reason: str) -> bytes:
        now = time.monotonic()
        if now - self._warned > 10.0:  # at most one line in 10 s
            self._warned = now
            emit(logging.INFO, "cache_coalesce_gave_up", policy=capture.cache.name, reason=reason,
                 message="requests waiting on an identical request on another replica go upstream themselves")
        return marker

    def _landed(self, capture: "Capture", marker: bytes) -> None:
        if marker == b"alone":
            capture.alone = True
        capture.complete(marker == b"done")

    async def _reader(self) -> RespConnection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        store = self.store
        return await redis_dial.dial(parse_url(store.url), store.connect_settings, store.sentinel)

    def _give_back(self, conn: RespConnection) -> None:
        if conn.closed:
            return
        if len(self._idle) < _IDLE_READERS:
            self._idle.append(conn)
        else:
            conn.close()
