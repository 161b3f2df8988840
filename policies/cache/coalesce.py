"""Identical requests in flight share one upstream call.

The first request of a key (the leader) goes upstream with a `Capture` on its context: the pipeline hands it
the answer as it passes (`body` for a plain answer, `events` for each piece of a stream it forwards), and
the leader's `after()` says how it ended (`complete`). Requests of the same key that arrive meanwhile (the
followers) wait on that capture instead of calling upstream:

- a plain follower waits for the end and is answered from the entry it made;
- a streaming follower waits for the first data event, then gets every event as it arrives (its own stream
  runs beside the leader's, not after it), and ends with the leader's end.

If the leader fails before any data event (every model failed, or its client left while waiting), the
followers go upstream themselves: the first becomes the next leader, the rest follow it, and so on for as many
leaders as fail in a row: one upstream call a round, never one a follower. If its client
leaves mid-stream, the pipeline keeps reading the upstream for the followers (`keep`). If the upstream
fails mid-stream, the followers' streams end with an error event, as the leader's does.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from policies.cache.entry import DONE, FINISHED, Entry, from_plain, from_stream, is_usage_chunk, split_events
from proxy.app.errors import ProxyError

if TYPE_CHECKING:
    from policies.cache.policy import ResponseCache

# What asking Redis for a key in flight across replicas came to (policies/cache/coalesce_redis.py). They live
# here so that the cache policy reads them without importing the Redis client, which a memory store never needs.
LEAD, FOLLOW, STORED, DOWN = "lead", "follow", "stored", "down"

_BACKGROUND: set[asyncio.Task] = set()


def forwarded_model(ctx) -> str:
    """The model of the attempt whose stream the pipeline forwards (the one attempt with its `stream` set)."""
    for attempt in reversed(ctx.attempts):
        if attempt.stream is not None:
            return attempt.target.model
    return ""


class Capture:
    """What one upstream answer is, as it comes: the tap the pipeline feeds, and what followers wait on."""

    __slots__ = ("cache", "key", "model", "who", "answered_by", "plain", "events", "ended", "entry", "served", "handed",
                 "followers", "_wake", "coalesced", "size", "too_big", "whole", "lease", "relay", "alone", "source")

    def __init__(self, cache: "ResponseCache", key: str, model: str, who: str) -> None:
        self.cache, self.key, self.model, self.who = cache, key, model, who
        self.answered_by = ""
        self.plain: bytes | None = None
        self.events: list[bytes] = []  # the stream's data events so far ([DONE] and comments left out)
        self.ended = False
        self.entry: Entry | None = None  # set when it ended with an answer worth storing
        # What its followers are answered with: the entry, or a whole answer not to store (content_filter).
        self.served: Entry | None = None
        self.handed = False  # the leader's client left mid-stream: the pipeline reads on for the followers
        self.followers = 0
        self.coalesced = False  # registered as the flight of its key
        self.size = 0
        self.too_big = False  # past max_entry_bytes: not stored, and no new follower may join
        self.whole = False  # ended with a whole answer (stored or not)
        self._wake = asyncio.Event()
        # Across replicas (policies/cache/coalesce_redis.py): the leader's hold on its key, or that this capture
        # relays another replica's answer (stored there, not here), and whether its followers must then go
        # upstream without trying the lease again.
        self.lease = None
        self.relay = False
        self.alone = False
        # The leader's request (its RequestContext), which names the model its stream comes from at the first
        # piece: a streaming follower's answer is sent before the leader's after() knows it.
        self.source = None

    # --- the pipeline's side ----------------------------------------------------------------------------

    def body(self, data: bytes) -> None:
        """A plain answer (status 200) went to the client."""
        self.plain = data
        lease = self.lease
        if lease is not None and lease.published:
            self.cache.shared.publish(lease, "p", data)

    def stream(self, data: bytes) -> None:
        """Whole SSE events went to the client (or, after `keep`, would have)."""
        if self.too_big and not self.followers:
            return
        if not self.answered_by and self.source is not None:
            self.answered_by = forwarded_model(self.source)
        lease = self.lease
        if lease is not None and lease.published:
            self.cache.shared.publish(lease, "d", data, self.answered_by)
        events = split_events(data)
        if events:
            self.events += events
            self.size += len(data)
            if self.size > self.cache.max_entry_bytes and not self.too_big:
                # Too large to store: the answer is not kept beyond what followers already waiting need.
                self.too_big = True
                self.cache.unlist(self)
                if not self.followers:
                    self.events = []
            self._notify()

    @property
    def followed(self) -> bool:
        return self.followers > 0 and not self.ended

    def keep(self, rest: Callable[[], Awaitable[None]]) -> None:
        """The leader's client left mid-stream while followers wait: `rest()` reads the stream to its end in a
        task of its own, feeding this capture, and calls `stream_ended`."""
        self.handed = True
        task = asyncio.get_running_loop().create_task(rest())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def stream_ended(self, complete: bool) -> None:
        self.complete(complete)

    # --- the end --------------------------------------------------------------------------------------------

    def complete(self, answered: bool) -> None:
        """The upstream call is over; `answered` when it gave a whole answer. Builds the entry (the only place
        JSON is parsed), stores it, and wakes the followers."""
        if self.ended:
            return
        entry = served = None
        if answered and not self.too_big:
            entry = served = self._entry(FINISHED)
            if entry is None and self.followers:  # whole, but not stored: still the followers' answer
                served = self._entry(None)
        self.entry, self.served = entry, served
        self.whole = answered
        self.ended = True
        self.cache.landed(self)
        self._notify()

    def _entry(self, finished: frozenset | None) -> Entry | None:
        if self.plain is not None:
            return from_plain(self.key, self.model, self.who, self.answered_by, self.plain, finished)
        if self.events:
            return from_stream(self.key, self.model, self.who, self.answered_by, self.events, finished)
        return None

    def _notify(self) -> None:
        wake = self._wake
        self._wake = asyncio.Event()
        wake.set()

    # --- the followers' side ----------------------------------------------------------------------------

    async def wait_end(self) -> None:
        while not self.ended:
            await self._wake.wait()

    async def wait_first(self) -> None:
        while not self.ended and not self.events:
            await self._wake.wait()

    async def follow(self, include_usage: bool, on_end: Callable[["Capture"], None]) -> AsyncIterator[bytes]:
        """The leader's stream for one follower, from its first event, as the events come; then the usage
        chunk when the follower asked for it, and `[DONE]`; or an error event when the leader's stream broke."""
        sent = 0
        while True:
            events = self.events
            if sent < len(events):
                batch = [e for e in events[sent:] if not is_usage_chunk(e)]
                sent = len(events)
                if batch:
                    yield b"".join(batch)
                continue
            if self.ended:
                break
            await self._wake.wait()
        on_end(self)
        if self.whole:
            usage = b""
            if include_usage:
                entry = self.served
                usage = entry.usage_event if entry is not None else next(
                    (e for e in self.events if is_usage_chunk(e)), b"")
            yield usage + DONE
        else:
            error = ProxyError(502, "The identical request this one waited for failed mid-stream.", type="server_error",
                               code="upstream_closed")
            yield error.sse_event()
