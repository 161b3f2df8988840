"""`cache`: answers a repeated request from the cache (`Respond`), streamed the way it is asked, and lets
identical requests in flight share one upstream call.

On each chat request the policy works out the key (policies/cache/key.py) and looks it up. A hit is answered
at once with the bytes the entry made when it was stored. A miss goes upstream with a `Capture` on the
context (policies/cache/coalesce.py), which the pipeline feeds with the answer as it passes; the policy's
`after()` stores it when the pipeline judged it a whole answer. Every response carries `x-groq-proxy-cache`
(HIT, MISS, BYPASS or COALESCED); a hit also `age`.

Policies listed before the cache see every request, hits included: a rate limit counts a hit as a request,
a token budget reserves for it as for any request and, at the end, is charged the entry's tokens only with
`charge_hits = true` (nothing otherwise). Policies after the cache see only the misses.

The cache never fails a request: a store that cannot be reached is a miss (logged, at most once in 10 s).
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

from policies.base import CONTINUE, Decision, Policy, Respond
from policies.cache.coalesce import DOWN, LEAD, STORED, Capture
from policies.cache.entry import Entry
from policies.cache.key import DEFAULT, cache_key, control, deterministic, single_choice
from policies.schema import check_keys, choice, count, seconds
from policies.scopes import scope
from proxy.app.config import ConfigError
from proxy.telemetry.logs import emit
from proxy.telemetry.metrics import Counter

SCOPES = ("global", "key", "user", "team")
HEADER = "x-groq-proxy-cache"
KEY_HEADER = "x-groq-proxy-cache-key"
SPAN_ATTRIBUTE = "groq_proxy.cache"
HIT, MISS, BYPASS, COALESCED = "HIT", "MISS", "BYPASS", "COALESCED"


class CacheMetrics:
    """groq_proxy_cache_requests_total{virtual_model,result} and the bytes and entries the caches hold."""

    def __init__(self) -> None:
        self.requests = Counter("groq_proxy_cache_requests_total",
                                "Requests through a cache policy by virtual model and result (hit, miss, bypass, "
                                "coalesced).", ("virtual_model", "result"))
        self.caches: list["ResponseCache"] = []

    def render(self, out: list[str]) -> None:
        self.requests.render(out)
        entries = size = 0
        for cache in self.caches:
            n, b = cache.store.held()
            entries, size = entries + n, size + b
        out.append("# HELP groq_proxy_cache_entries Answers the response cache holds (with Redis: as the last "
                   "write this process made saw them).\n# TYPE groq_proxy_cache_entries gauge\n"
                   f"groq_proxy_cache_entries {entries}\n"
                   "# HELP groq_proxy_cache_bytes Bytes of the answers the response cache holds.\n"
                   "# TYPE groq_proxy_cache_bytes gauge\n"
                   f"groq_proxy_cache_bytes {size}\n")


class ResponseCache(Policy):
    uses_store = True  # on the memory store each process would keep its own cache: several workers need Redis

    def __init__(self, scope: str = "global", ttl_s: float = 3600.0, max_entries: int = 10000,
                 max_bytes: int = 100 * 1024 * 1024, max_entry_bytes: int = 1024 * 1024, cacheable: str = "always",
                 coalesce: bool = True, charge_hits: bool = False, coalesce_wait_s: float = 60.0) -> None:
        self.scope, self.ttl_s, self.cacheable = scope, ttl_s, cacheable
        self.max_entries, self.max_bytes, self.max_entry_bytes = max_entries, max_bytes, max_entry_bytes
        self.coalesce, self.charge_hits, self.coalesce_wait_s = coalesce, charge_hits, coalesce_wait_s
        self.store = None  # MemoryCache or RedisCache, opened by start()
        self.shared = None  # SharedFlights: coalescing across replicas, on Redis with coalesce = true
        self.flights: dict[str, Capture] = {}
        self.metrics: CacheMetrics | None = None
        self._labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._warned = 0.0

    @classmethod
    def options(cls, raw: Mapping, where: str) -> dict:
        check_keys(raw, {"scope", "ttl_s", "max_entries", "max_bytes", "max_entry_bytes", "cacheable", "coalesce",
                         "charge_hits", "coalesce_wait_s"}, where)
        ttl = seconds(raw, "ttl_s", where, 3600.0)
        if ttl <= 0:
            raise ConfigError(f"{where}.ttl_s: must be more than 0")
        out = {"scope": choice(raw, "scope", where, SCOPES, "global"), "ttl_s": ttl,
               "max_entries": count(raw, "max_entries", where, 10000),
               "max_bytes": count(raw, "max_bytes", where, 100 * 1024 * 1024),
               "cacheable": choice(raw, "cacheable", where, ("always", "deterministic"), "always")}
        out["max_entry_bytes"] = count(raw, "max_entry_bytes", where, min(1024 * 1024, out["max_bytes"]))
        out["coalesce_wait_s"] = seconds(raw, "coalesce_wait_s", where, 60.0)
        if out["coalesce_wait_s"] <= 0:
            raise ConfigError(f"{where}.coalesce_wait_s: must be more than 0")
        for flag, default in (("coalesce", True), ("charge_hits", False)):
            value = raw.get(flag, default)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{flag}: must be true or false, got {value!r}")
            out[flag] = value
        return out

    async def start(self, store, metrics) -> None:
        if store.backend == "redis":
            from policies.cache.store_redis import RedisCache

            self.store = RedisCache(store.url, self.name, ttl_s=self.ttl_s, max_entries=self.max_entries,
                                    max_bytes=self.max_bytes, max_entry_bytes=self.max_entry_bytes,
                                    timeout_s=store.timeout_s, prefix=store.prefix, connect=store.connect)
            if self.coalesce:
                from policies.cache.coalesce_redis import SharedFlights

                self.shared = SharedFlights(self.store, self.coalesce_wait_s)
        else:
            from policies.cache.store_memory import MemoryCache

            self.store = MemoryCache(self.ttl_s, self.max_entries, self.max_bytes, self.max_entry_bytes)
        await self.store.start()
        if metrics is not None:
            cache_metrics = next((m for m in metrics.all if isinstance(m, CacheMetrics)), None)
            if cache_metrics is None:
                cache_metrics = CacheMetrics()
                metrics.all = metrics.all + (cache_metrics,)
            cache_metrics.caches.append(self)
            self.metrics = cache_metrics

    def cache_stats(self) -> dict:
        """What the status page shows of this cache (proxy/admin/status.py)."""
        entries, size = self.store.held() if self.store is not None else (0, 0)
        stats = {"backend": self.store.backend if self.store is not None else None, "entries": entries,
                 "bytes": size, "in_flight": len(self.flights),
                 "waiting": sum(flight.followers for flight in self.flights.values())}
        if self.shared is not None:  # keys of other replicas followed now, and misses past that bound
            stats["relays"], stats["relays_full"] = self.shared.relaying, self.shared.relays_full
        return stats

    async def close(self) -> None:
        if self.metrics is not None and self in self.metrics.caches:  # a reload's new policy counts from now on
            self.metrics.caches.remove(self)
        if self.shared is not None:
            await self.shared.close()
        if self.store is not None:
            await self.store.close()

    # --- the request ------------------------------------------------------------------------------------

    async def on_request(self, ctx) -> Decision:
        body = ctx.body
        ctl = control(ctx.headers.get("cache-control")) if ctx.headers is not None else DEFAULT
        if (ctx.operation != "chat" or not ctl.store or not single_choice(body)
                or (self.cacheable == "deterministic" and not deterministic(body))):
            return self._pass(ctx, BYPASS)
        route = ctx.route
        model = route.virtual or route.requested
        who = "all" if self.scope == "global" else scope(ctx, self.scope)
        key = cache_key(model, body, who)
        if not ctl.lookup:  # no-cache: a fresh answer, stored
            self._lead(ctx, key, model, who, join=False)
            return self._pass(ctx, BYPASS, key)
        shared = self.shared if self.mode == "enforce" else None
        # A leader that fails is followed by the next: one upstream call a round, however many rounds, never one
        # a follower at once (which a cap on rounds came to). Each failed round ends its leader's request (its
        # own error, or its client gone), so a request waits on no more leaders than came before it; a round that
        # ends no request (a relay given up, an entry stored meanwhile) turns `alone`: no lease again.
        while True:
            entry = await self._get(key, model)
            if entry is not None and (ctl.max_age is None or entry.age() <= ctl.max_age):
                return self._answer(ctx, entry, HIT, key)
            flight = self.flights.get(key) if self.coalesce and self.mode == "enforce" else None
            if flight is None:
                if shared is None:
                    break
                flight = await self._claim(ctx, shared, key, model, who, stale=entry is not None)
                if flight is None:
                    return self._pass(ctx, MISS, key)
            decision = await self._follow(ctx, flight, key)
            if decision is not None:
                return decision
            if flight.alone:  # the other replica's request could not be followed: no lease for this one
                shared = None
        self._lead(ctx, key, model, who, join=self.coalesce)
        return self._pass(ctx, MISS, key)

    async def after(self, ctx) -> None:
        capture = ctx.tap
        if capture is None or capture.cache is not self or capture.handed:
            return
        answered = ctx.answered
        if answered is not None and answered.outcome == "answered":
            capture.answered_by = answered.target.model
            capture.complete(True)
        else:
            capture.complete(False)

    # --- what the pipeline's capture reports ------------------------------------------------------------

    def unlist(self, capture: Capture) -> None:
        """No further request may join this capture (it ended, or grew too large to store)."""
        if capture.coalesced and self.flights.get(capture.key) is capture:
            del self.flights[capture.key]

    def landed(self, capture: Capture) -> None:
        """A capture ended: it is no longer the flight of its key, and its entry (if any) is stored (by the
        replica that went upstream, when it relayed another's)."""
        self.unlist(capture)
        if capture.lease is not None:
            self.shared.end(capture, self.store.put(capture.entry) if capture.entry is not None else None)
        elif capture.entry is not None and not capture.relay:
            self.store.keep(capture.entry)

    # --- helpers ----------------------------------------------------------------------------------------

    def _lead(self, ctx, key: str, model: str, who: str, join: bool) -> None:
        capture = Capture(self, key, model, who)
        capture.source = ctx
        ctx.tap = capture
        if join and self.mode == "enforce" and key not in self.flights:
            capture.coalesced = True
            self.flights[key] = capture

    async def _claim(self, ctx, shared, key: str, model: str, who: str, stale: bool) -> Capture | None:
        """A miss with no flight of its key here asks Redis (policies/cache/coalesce_redis.py). Its capture is
        this process's flight meanwhile, so identical requests arriving here wait on it, not on Redis. None
        when this request leads (its capture is on the context); else the capture to follow."""
        capture = Capture(self, key, model, who)
        capture.coalesced = True
        self.flights[key] = capture
        try:
            outcome = await shared.claim(capture, stale)
        except BaseException:  # its client left while Redis was asked: nothing may wait on it
            capture.complete(False)
            raise
        if outcome in (LEAD, DOWN):
            capture.source = ctx
            ctx.tap = capture
            return None
        if outcome == STORED:  # stored since the lookup: this request and any that joined look it up again
            capture.relay = True
            capture.alone = True  # should that miss again (evicted, unreadable), no endless lookups: no lease
            capture.complete(False)
        return capture

    async def _follow(self, ctx, flight: Capture, key: str) -> Decision | None:
        """Waits on an identical request in flight: an answer, or None when it failed before any data."""
        flight.followers += 1
        try:
            if ctx.stream:
                await flight.wait_first()
                if flight.events and flight.served is None and not flight.ended:
                    return self._live(ctx, flight, key)
            else:
                await flight.wait_end()
        finally:
            flight.followers -= 1
        if flight.served is not None:
            return self._answer(ctx, flight.served, COALESCED, key)
        if flight.ended and flight.whole and flight.events and ctx.stream:
            return self._live(ctx, flight, key)  # whole but too large to store: replayed from what it captured
        return None  # it failed (or broke mid-stream before this request sent anything): go upstream

    def _live(self, ctx, flight: Capture, key: str) -> Respond:
        flight.followers += 1
        options = ctx.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def on_end(capture: Capture) -> None:
            capture.followers -= 1
            if capture.served is not None and self.charge_hits:
                ctx.policy.served_tokens = capture.served.tokens  # settled after the stream, at the end

        self._count(ctx, COALESCED)
        ctx.policy.served_tokens = 0  # the tokens are known at the end (on_end), when charge_hits wants them
        headers = {HEADER: COALESCED, KEY_HEADER: key}
        if flight.answered_by:  # the model its first piece came from (a stream's end is not known yet)
            headers["x-groq-proxy-model"] = flight.answered_by
        return Respond(events=flight.follow(include_usage, on_end), headers=headers)

    def _answer(self, ctx, entry: Entry, result: str, key: str) -> Respond:
        self._count(ctx, result)
        if self.mode == "enforce":  # a shadow hit is not the answer: upstream's is charged
            ctx.policy.served_tokens = entry.tokens if self.charge_hits else 0
        shape = 0
        if ctx.stream:
            options = ctx.body.get("stream_options")
            shape = 2 if isinstance(options, dict) and options.get("include_usage") is True else 1
        age = int(entry.age()) if result == HIT else -1
        last = entry.replies[shape]
        if last is not None and last[0] == age:
            return last[1]
        headers = {HEADER: result, KEY_HEADER: key, "x-groq-proxy-model": entry.answered_by}
        if result == HIT:
            headers["age"] = str(age)
        if shape == 0:
            reply = Respond(body=entry.plain, headers=headers)
        else:
            reply = Respond(events=(entry.stream_usage if shape == 2 else entry.stream,), headers=headers)
        entry.replies[shape] = (age, reply)
        return reply

    def _pass(self, ctx, result: str, key: str | None = None) -> Decision:
        if key is not None and self.mode == "enforce":
            ctx.policy.headers[KEY_HEADER] = key
        self._count(ctx, result)
        return CONTINUE

    def _count(self, ctx, result: str) -> None:
        # On whatever answers the request, a refusal after a hit included; a shadow cache changes no answer, nor
        # its headers (it is counted, and its result is on the span).
        if self.mode == "enforce":
            ctx.policy.headers[HEADER] = result
        if ctx.span is not None:
            ctx.span.attrs[SPAN_ATTRIBUTE] = result
        if self.metrics is not None:
            label = ctx.route.label
            key = self._labels.get((label, result))
            if key is None:  # route labels are the config's names (or `other`): a small, fixed set
                key = self._labels[(label, result)] = (label, result.lower())
            self.metrics.requests.inc(key)

    async def _get(self, key: str, model: str) -> Entry | None:
        try:
            return await self.store.get(key, model)
        except Exception as exc:  # the cache never fails a request: a store that is down is a miss
            now = time.monotonic()
            if now - self._warned > 10.0:
                self._warned = now
                emit(logging.WARNING, "cache_lookup_failed", policy=self.name, error=type(exc).__name__,
                     message="the cache store could not be read; answering as a miss")
            return None

