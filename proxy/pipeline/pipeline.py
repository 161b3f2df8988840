"""The request pipeline: policies, then the chain of attempts, each falling over to the next until one answers.

The commit point is explicit. Before the first data event reaches the client, any attempt failure moves on
to the next model of the chain. After it, a failure ends the stream with one SSE error event.

Endpoints other than chat and embeddings (the Responses API, audio) run the same chain with an operation on
their context (proxy/pipeline/operation.py) that says where they go upstream, what their answer and commit point
are and how their error event looks; chat and embeddings have none and take the paths below unchanged.

Deadlines: a plain answer has timeout_s for the whole (Groq sends nothing of it before all of it is generated);
a stream has first_byte_timeout_s to its first data event (`_open`), then timeout_s (`_forward`). A client that
hangs up cancels the handler's task, and with it the attempt in flight and the rest of the chain.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time

import orjson
from aiohttp import web

from policies.base import CONTINUE, Skip
from policies.chain import PolicyChain
from proxy.pipeline.whole_answer import WholeAnswer, whole_answer
from proxy.pipeline.respond import respond
from proxy.pipeline.client_stream import ClientGone, ClientStream
from proxy.app.config import Config
from proxy.pipeline.context import Attempt, RequestContext
from proxy.pipeline.hedge import race
from proxy.pipeline.tap import keep_for_followers
from proxy.routing.hints import read_hints
from proxy.routing.plan import Plan, Planner
from proxy.routing.router import Router
from proxy.routing.state import RoutingState
from proxy.routing.tiers import TierChooser
from proxy.routing.cooldown import Cooldowns
from proxy.app.errors import ProxyError
from proxy.upstream.http1 import BadResponse, ConnectFailed, ConnectTimeout, UpstreamError
from proxy.telemetry.logs import emit, redact
from proxy.telemetry.observe import Observer, output_from_choices, output_from_stream
from proxy.upstream.sse import EventSplitter, StreamState, first_data_end, scan, well_formed_prefix
from proxy.upstream.providers import AttemptFailed, Provider, Upstreams, classify

INFO, WARNING = logging.INFO, logging.WARNING

# Never sent upstream: hop-by-hop headers, what the proxy sets itself (the body is the proxy's own JSON, so the
# client's content-* headers do not describe it), and the client's own credentials.
_DROP_REQUEST_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "content-type", "content-encoding",
        "authorization", "accept-encoding", "cookie", "x-api-key", "api-key",
        # the proxy's own: routing hints (proxy/routing/hints.py) and what the request is for (the policies)
        "x-max-latency-ms", "x-hedge", "x-hedge-after-ms", "x-model-tier", "x-request-type", "x-module",
    }
)
_SIMULATED = {"x-groq-proxy-simulated": "true"}
_FIRST_DATA = re.compile(rb"(?:^|\n)data: ?(\[DONE\])?")  # the stream's first data line, and whether it is the end
DONE_EVENT = b"data: [DONE]\n\n"
# Answers about the key rather than the model: with a pool, the same model is tried with the next key.
_KEY_STATUSES = frozenset({401, 403, 429})


def _forwarded_headers(request: web.Request) -> dict[str, str]:
    """The client's end-to-end headers that go upstream with every attempt."""
    drop = _DROP_REQUEST_HEADERS
    if "Connection" in request.headers:  # headers the client named in Connection are hop-by-hop too (RFC 9110, 7.6.1)
        for line in request.headers.getall("Connection"):  # every line: a field sent twice is one list
            drop = drop | {token.strip().lower() for token in line.split(",")}
    headers = {}
    for name, value in request.headers.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith("x-groq-proxy-"):
            headers[lower] = value  # lower case: a traced attempt's own `traceparent` replaces the caller's
    return headers


def _upstream_failure(exc: UpstreamError) -> AttemptFailed:
    """connect_timeout or connect_error when no connection was made; malformed when the answer was not HTTP;
    upstream_closed when the connection was made and broke."""
    if isinstance(exc, ConnectTimeout):
        return AttemptFailed("connect_timeout", "connect timed out")
    if isinstance(exc, ConnectFailed):
        return AttemptFailed("connect_error", str(exc)[:200])
    return AttemptFailed("malformed" if isinstance(exc, BadResponse) else "upstream_closed", str(exc)[:200])


# Upstream response headers worth handing to the client: Groq's rate-limit view, its region, its request id.
_PASSED_ON = (
    "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-groq-region",
)


def _passed_on(upstream_headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for name in _PASSED_ON:  # looked up by name: cheaper than walking every upstream header
        value = upstream_headers.get(name)
        if value is not None:
            out[name] = value
    value = upstream_headers.get("x-request-id")
    if value is not None:
        out["x-upstream-request-id"] = value
    return out


class Pipeline:
    def __init__(
        self, config: Config, upstreams: Upstreams, cooldowns: Cooldowns, policies: PolicyChain, observer: Observer,
        routing: RoutingState | None = None, router: Router | None = None,
    ) -> None:
        self.config = config
        self.routing = routing = routing or RoutingState(config)
        self.planner = Planner(config, routing.observed)
        self.tiers = TierChooser(config, router or Router(config), routing.observed)
        self.upstreams = upstreams
        self.cooldowns = cooldowns
        self.policies = policies
        self.observer = observer
        self._keepalive_s = config.server.keepalive_s
        self.extra_headers = _SIMULATED if config.simulated else {}  # on every response, errors included

    # --- the request -------------------------------------------------------------------------------------

    async def handle(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        ctx.base_headers = base_headers = {"x-request-id": ctx.request_id, **self.extra_headers}
        ctx.hints = hints = read_hints(request.headers)  # before the policies: a bad header is a 400 at once
        if ctx.route.auto:  # the tier is the proxy's to choose, from the request's hints
            ctx.auto = True
            ctx.route = self.tiers.choose(request.headers, hints, ctx.stream)
            ctx.chain = ctx.route.chain
        body = ctx.body
        if ctx.route.entry_params:
            ctx.client_fields = frozenset(body)
        params = ctx.route.params
        if params:
            for key, value in params.items():
                body.setdefault(key, value)
        policies = self.policies
        active = bool(policies)  # PolicyChain.__bool__ is a Python call: asked once, not three times
        # A client that leaves cancels this task (the app sets aiohttp's handler_cancellation): the attempt in
        # flight ends with it, its upstream connection is closed, and no further model is tried. A latency
        # target's deadline does the same from inside.
        try:
            # --- policies: admit, refuse or answer; `after()` runs in the finally whatever happens ---
            if active:
                policies.begin(ctx, request.headers)
                # The built-ins' plan on the memory store needs no coroutine (policies/plan.py)
                decision = policies.admit_planned(ctx) if policies.planned else None
                if decision is None:
                    decision = await policies.on_request(ctx, planned=False)
                if decision is not CONTINUE:
                    if ctx.policy.headers:
                        base_headers.update(ctx.policy.headers)
                    return await respond(request, decision, base_headers)
                if ctx.policy.headers:
                    base_headers.update(ctx.policy.headers)
            ctx.forwarded = _forwarded_headers(request)
            if ctx.stream:
                ctx.client = ClientStream(request, self._keepalive_s, base_headers)
            plan = self.planner.plan(ctx)
            if plan.deadline_s is None:
                return await self._chain(ctx, plan)
            loop = asyncio.get_running_loop()
            ctx.deadline = loop.time() + plan.deadline_s
            try:
                async with asyncio.timeout_at(ctx.deadline):
                    return await self._chain(ctx, plan)
            except TimeoutError:
                return await self._deadline_passed(ctx, plan.deadline_s)
        finally:
            ctx.settling = True  # from here a drain's cut would lose the settlement (proxy/app/drain.py)
            try:
                if ctx.client is not None and ctx.client.keeping_alive:
                    await ctx.client.stop_keepalive()
            finally:  # a second cancellation while the comments stop must not skip the settlement
                if active:
                    if ctx.answered is not None and policies.has_on_response:
                        await policies.on_response(ctx, ctx.answered)
                    if not (policies.planned and policies.give_back_planned(ctx)):
                        await policies.after(ctx)

    async def _policy_skips(self, ctx: RequestContext, index: int, target) -> bool:
        """A policy's before_attempt may pass over this model: recorded as a skipped attempt."""
        attempt = Attempt(index, target)
        decision = await self.policies.before_attempt(ctx, attempt)
        if not isinstance(decision, Skip):
            return False
        ctx.attempts.append(attempt)
        attempt.outcome, attempt.reason, attempt.detail = "skipped", "policy", decision.reason
        self._end(ctx, attempt, INFO)
        return True

    async def _chain(self, ctx: RequestContext, plan: "Plan") -> web.StreamResponse:
        """The chain in the plan's order, each model with its keys, a hedge alongside when the plan has one;
        the first answer goes to the client, or one error when every model failed."""
        chain = ctx.chain
        skipped = []
        hedges = 0
        position = 0
        while position < len(chain):
            index, target = position, chain[position]
            position += 1
            wait = self.cooldowns.remaining(target.key)
            if wait:
                skipped.append(self._skip(ctx, index, target, "cooldown", f"cooling down for {wait:.1f}s more", wait))
                continue
            if self.policies and self.policies.has_before_attempt and await self._policy_skips(ctx, index, target):
                continue
            if (plan.hedge_after_ms is None or hedges >= plan.max_hedges or position >= len(chain)
                    or ctx.op is not None and ctx.op.opens):
                result = await self._model(ctx, index, target)
            else:
                delay = plan.hedge_delay(target, ctx.stream, self.routing.observed)
                if delay is None:
                    result = await self._model(ctx, index, target)
                else:
                    def hedge():  # called only when the timer fires: the next model not cooling down
                        nonlocal position
                        while position < len(chain):
                            nxt = position
                            position += 1
                            if not self.cooldowns.remaining(chain[nxt].key):
                                if not self.policies:
                                    return self._model(ctx, nxt, chain[nxt], hedge=True)

                                def refused():  # no room for a second attempt: that model stays next in the chain
                                    nonlocal position
                                    if position == nxt + 1:
                                        position = nxt

                                return self._hedge(ctx, nxt, chain[nxt], refused)
                        return None

                    result, started = await race(
                        self._model(ctx, index, target), hedge, delay,
                        lambda winner: self._mark_losers(ctx, winner), self._discard,
                    )
                    if started:
                        hedges += 1
            if result is not None:
                return await self._finish(ctx, result)
        if skipped and len(skipped) == len(chain):
            # Every model is cooling down. Refusing outright would turn a short blip into a whole
            # cool-down of refusals, so probe the model whose cool-down ends first: one call, never more
            # (what Envoy calls panic mode). If it fails, the error below says so.
            first = min(skipped, key=lambda a: a.retry_after)
            result = await self._model(ctx, first.index, first.target, probe=True)
            if result is not None:
                return await self._finish(ctx, result)
        error = all_failed_error(ctx)
        if ctx.client is not None:
            return await ctx.client.fail(error, ctx.base_headers, _op_event(ctx, error))
        return error.to_response(ctx.base_headers)

    async def _hedge(self, ctx: RequestContext, index: int, target, refused):
        """A hedge's attempt, once the policies have reserved for a second attempt in flight (a budget without
        room for it: no hedge, and `refused()` leaves the model for the chain to try later)."""
        if not await self.policies.reserve_hedge(ctx):
            refused()
            return None
        return await self._model(ctx, index, target, hedge=True)

    async def _model(self, ctx: RequestContext, index: int, target, hedge: bool = False, probe: bool = False):
        """One model, with each key of its provider's pool in turn while the failure is the key's (401/403,
        429): an opened stream or an answer, or None when the chain should move on. A `probe` (every model is
        resting) goes out with the first key whatever its rest."""
        pool = self.routing.pools[target.provider]
        keys = pool.order() or ([0] if probe else [])
        if not keys:
            wait = pool.resting_for()
            self._skip(ctx, index, target, "keys_rested", f"every key is resting for {wait:.1f}s more", wait)
            return None
        provider = self.upstreams.providers[target.provider]
        limits = self.routing.limits
        for key in keys:
            blocked = None if probe else limits.blocked(target.key, key, ctx.estimated_tokens)
            if blocked is not None:
                reason, wait = blocked
                detail = ("its rate limit would not fit this request for " if reason == "rate_limit_predicted"
                          else "rate-limited for ") + f"{wait:.1f}s more"
                self._skip(ctx, index, target, reason, detail, wait, key, provider.key_names[key])
                continue
            attempt = Attempt(index, target, key, provider.key_names[key])
            attempt.hedge = hedge
            result = await self._try(ctx, attempt, provider)
            if result is not None:
                return result
            if attempt.status not in _KEY_STATUSES or len(keys) == 1 or probe:
                return None
        return None

    async def _finish(self, ctx: RequestContext, result) -> web.StreamResponse:
        if isinstance(result, _Opened):
            return await self._forward(ctx, result.attempt, result.provider, result)
        if ctx.tap is not None and ctx.answered is not None and result.status == 200:
            ctx.tap.body(result.body)  # the cache's capture of a plain answer
        if ctx.op is not None and not isinstance(result, (web.StreamResponse, WholeAnswer)):
            return await result.forward()  # an operation's own byte stream past its commit point (audio)
        if ctx.identity is not None and ctx.answered is not None and ctx.op is not None and ctx.op.owned:
            await ctx.op.own(self.policies, ctx.identity, ctx.body, ctx.answered.response_id)
        return result

    async def _deadline_passed(self, ctx: RequestContext, seconds: float) -> web.StreamResponse:
        """Past the latency target: 504 deadline_exceeded, or its error event on a stream already begun."""
        error = ProxyError(
            504, f"No answer within the latency target of {seconds * 1000:.0f} ms (request {ctx.request_id}).",
            type="server_error", code="deadline_exceeded", headers={"x-should-retry": "false"},
        )
        if ctx.client is not None:
            if ctx.client.prepared:
                return await ctx.client.finish(_op_event(ctx, error) or error.sse_event())
            return await ctx.client.fail(error, ctx.base_headers, _op_event(ctx, error))
        return error.to_response(ctx.base_headers)

    def _mark_losers(self, ctx: RequestContext, winner) -> None:
        """A hedge race was won: every other attempt still in flight lost it (and is cancelled next)."""
        won = winner.attempt if isinstance(winner, _Opened) else ctx.answered
        for attempt in ctx.attempts:
            if attempt.outcome == "pending" and attempt is not won:
                attempt.outcome = "hedge_lost"

    def _discard(self, result) -> None:
        """A racer that finished too, after the winner: its stream is closed unread."""
        if isinstance(result, _Opened):
            result.resp.close()
            attempt = result.attempt
            attempt.outcome, attempt.reason, attempt.detail = "hedge_lost", "hedge_lost", "another attempt won"
            self._end(result.ctx, attempt, INFO)

    async def _try(self, ctx: RequestContext, attempt: Attempt, provider: Provider):
        """One attempt at one model with one key: an opened stream, an answer, or None when it failed in a way
        the next key or model may not."""
        ctx.attempts.append(attempt)
        target = attempt.target
        body = ctx.body
        body["model"] = target.model
        op = ctx.op
        if target.params:
            body = self._with_entry_params(ctx, target.params)
        payload = orjson.dumps(body) if op is None else op.encode(body)
        headers = {**ctx.forwarded, **provider.key_headers[attempt.key]}
        if op is not None and op.content_type is not None:
            headers["Content-Type"] = op.content_type
        self.observer.attempt_started(ctx, attempt, provider, headers)
        self.routing.limits.spend(target.key, attempt.key, ctx.tokens_if_estimated)
        try:
            if ctx.client is not None:
                return await self._open(ctx, attempt, provider, payload, headers, self._first_event, "first event")
            if op is not None and op.opens:
                return await op.open(self, ctx, attempt, provider, payload, headers)
            return await self._plain(ctx, attempt, provider, payload, headers)
        except AttemptFailed as failure:
            self._fell_over(ctx, attempt, failure, provider)
            return None
        except asyncio.CancelledError:
            if attempt.ended is None:
                self._cancelled(ctx, attempt)
            raise

    def _with_entry_params(self, ctx: RequestContext, params) -> dict:
        """The body for a chain entry with its own params: over the tier's, under what the client set."""
        body = dict(ctx.body)
        client = ctx.client_fields or ()
        for key, value in params.items():
            if key not in client:
                body[key] = value
        return body

    def _cancelled(self, ctx: RequestContext, attempt: Attempt) -> None:
        if attempt.outcome == "hedge_lost":
            attempt.reason, attempt.detail = "hedge_lost", "another attempt produced a data event first"
        elif ctx.deadline is not None and asyncio.get_running_loop().time() >= ctx.deadline:
            attempt.outcome, attempt.reason = "cancelled", "deadline_exceeded"
        elif ctx.drained:  # past server.drain_timeout_s of a shutdown
            attempt.outcome, attempt.reason = "cancelled", "shutting_down"
        else:  # the client went away while this attempt was in flight
            attempt.outcome, attempt.reason = "cancelled", "client_disconnected"
        self._end(ctx, attempt, INFO)

    # --- one attempt, not streamed ----------------------------------------------------------------------

    async def _plain(self, ctx: RequestContext, attempt: Attempt, provider: Provider, payload, headers):
        op = ctx.op
        if op is not None:
            path = provider.path(op.endpoint)
        else:
            path = provider.chat_path if ctx.operation == "chat" else provider.embeddings_path
        resp = None
        try:
            # Groq sends nothing of a plain answer until all of it is generated, so a first-byte deadline would
            # cut generation short: the whole attempt is bounded by timeout_s (the connect by connect_timeout_s).
            async with asyncio.timeout(provider.total_s):
                resp = await self.upstreams.client.request(
                    provider.origin, "POST", path, headers, payload, provider.connect_s
                )
                attempt.first_byte = time.perf_counter()
                self.routing.limits.observe(attempt.target.key, attempt.key, resp.headers)
                body = await resp.read()
        except TimeoutError:
            raise AttemptFailed("timeout", f"not complete in {provider.total_s:g}s") from None
        except UpstreamError as exc:
            raise _upstream_failure(exc) from None
        finally:
            if resp is not None:
                resp.release()
        attempt.status = status = resp.status
        if status != 200:
            failure = classify(status, body, resp.headers, chain=ctx.route.virtual is not None)
            if failure is not None:
                raise failure
            return self._passed_back(ctx, attempt, status, body, resp)
        if op is not None:
            content_type = op.answer(attempt, body, resp.headers.get("content-type", ""), self.observer.record_content)
            return self._plain_answer(ctx, attempt, body, resp, content_type)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise AttemptFailed("malformed", "200 with a body that is not JSON") from None
        if ctx.operation == "chat":
            choices = _completion_choices(obj)
            attempt.finish_reasons = [c.get("finish_reason") for c in choices]
            if self.observer.record_content:
                attempt.content = output_from_choices(choices)
        else:
            _check_embeddings(obj)
        attempt.usage = obj.get("usage")
        attempt.response_id = obj.get("id")
        attempt.response_model = obj.get("model")
        return self._plain_answer(ctx, attempt, body, resp, "application/json")

    def _plain_answer(self, ctx: RequestContext, attempt: Attempt, body: bytes, resp, content_type: str):
        if ctx.answered is not None:
            # Two racers of a hedge done in the same turn of the loop: the one that answered first has won. This
            # one's usage stays on it: budgets charge what every attempt produced.
            attempt.outcome, attempt.reason = "hedge_lost", "hedge_lost"
            attempt.detail = "another attempt answered first"
            self._end(ctx, attempt, INFO)
            return None
        self._answered(ctx, attempt)
        headers = {**ctx.base_headers, **self._answer_headers(ctx, attempt), **_passed_on(resp.headers)}
        if ctx.policy is not None and ctx.policy.headers:  # the proxy's own x-ratelimit-* replace Groq's
            headers.update(ctx.policy.headers)
        headers["Content-Type"] = content_type
        return whole_answer(200, headers, body) or web.Response(body=body, headers=headers)

    # --- one attempt, streamed: opened until its first data event, then forwarded past the commit point ------

    async def _open(self, ctx: RequestContext, attempt: Attempt, provider: Provider, payload, headers,
                    read_first, awaited: str):
        """Sends the request and reads up to the commit point (`read_first`), within first_byte_timeout_s.
        Nothing has reached the client yet, so any failure here falls over (AttemptFailed). Returns the opened
        stream, or the response that passes the upstream's client error back. Every streamed attempt opens
        here: SSE (`_first_event`) and audio bytes (proxy/pipeline/byte_stream.py); `awaited` names what
        first_byte_timeout_s waits for."""
        start = asyncio.get_running_loop().time()
        resp = None
        opened = None
        op = ctx.op
        try:
            async with asyncio.timeout_at(start + provider.first_byte_s):
                resp = await self.upstreams.client.request(
                    provider.origin, "POST", provider.chat_path if op is None else provider.path(op.endpoint),
                    headers, payload, provider.connect_s,
                )
                attempt.status = resp.status
                self.routing.limits.observe(attempt.target.key, attempt.key, resp.headers)
                if resp.status != 200:
                    return await self._refused(ctx, attempt, resp)
                opened = await read_first(ctx, attempt, provider, resp, start)
                return opened
        except TimeoutError:
            raise AttemptFailed("first_byte_timeout", f"no {awaited} in {provider.first_byte_s:g}s") from None
        except UpstreamError as exc:
            raise _upstream_failure(exc) from None
        finally:
            if resp is not None and opened is None:  # failed, or passed back: this response goes no further
                resp.release()

    async def _refused(self, ctx: RequestContext, attempt: Attempt, resp):
        """A status other than 200 before the commit point: AttemptFailed when the next model may answer, else
        the upstream's answer passed back to the client (an error event once keep-alives sent the head)."""
        body = await resp.read()
        failure = classify(resp.status, body, resp.headers, chain=ctx.route.virtual is not None)
        if failure is not None:
            raise failure
        client = ctx.client
        if client is not None and client.prepared:  # keep-alives went out: the status can no longer change
            attempt.outcome = "passed_back"
            self._end(ctx, attempt, INFO)
            return await client.finish(_error_event(resp.status, body, ctx.op))
        return self._passed_back(ctx, attempt, resp.status, body, resp)

    async def _first_event(self, ctx: RequestContext, attempt: Attempt, provider: Provider, resp, start: float):
        """An SSE stream read up to its first data event and scanned: the opened stream, or AttemptFailed."""
        if not resp.content_type.startswith("text/event-stream"):
            raise AttemptFailed("malformed", f"200 with {resp.content_type or 'no content type'}, not a stream")
        op = ctx.op
        # The commit point: chat's first data event, or where the operation puts it (`Operation.commit_end`).
        commit_end = first_data_end if op is None else op.commit_end
        splitter = EventSplitter()
        first = b""
        # Comments do not count as a first event. Whatever arrived with the first event has not reached
        # the client either, so a failure in it still falls over.
        while commit_end(first) < 0:
            chunk = await resp.readany()
            if not chunk:
                raise AttemptFailed("upstream_closed", "the stream ended before its first event")
            first += splitter.feed(chunk)
        attempt.first_byte = time.perf_counter()
        if op is None:
            state = StreamState()
            scan(first, state)
        else:
            state = op.new_state()
            op.scan(first, state)
        if state.error is not None:
            raise AttemptFailed("upstream_error_event", f"error event: {_describe(state.error)}")
        if state.malformed:
            raise AttemptFailed("malformed", state.malformed)
        if op is None and state.done and _FIRST_DATA.search(first).group(1) == b"[DONE]":
            raise AttemptFailed("malformed", "the stream ended ([DONE]) before its first chunk")
        attempt.response_id, attempt.response_model = state.response_id, state.response_model
        return _Opened(resp, splitter, first, state, start, ctx, attempt, provider)

    async def _forward(self, ctx: RequestContext, attempt: Attempt, provider: Provider, opened: "_Opened"):
        """The commit point, then the rest of the stream as it comes, until timeout_s from the attempt's start.
        A failure from here on ends the stream with one error event."""
        client: ClientStream = ctx.client
        resp, splitter, state = opened.resp, opened.splitter, opened.state
        recorded = [opened.first] if self.observer.record_content else None
        tap = ctx.tap  # a policy's view of the answer (proxy/pipeline/tap.py): every piece the client is sent
        kept = False  # the client left while identical requests wait on this stream: read on for them
        op = ctx.op
        scan_ = scan if op is None else op.scan
        try:
            async with asyncio.timeout_at(opened.start + provider.total_s):
                answer_headers = {**self._answer_headers(ctx, attempt), **_passed_on(resp.headers)}
                if ctx.policy is not None and ctx.policy.headers:  # the proxy's own x-ratelimit-* replace Groq's
                    answer_headers.update(ctx.policy.headers)
                # The data events that reached the client: chat's scanner counts them as it goes.
                attempt.events = state.events if op is None else opened.first.count(b"data:")
                attempt.stream = state
                if ctx.identity is not None and op is not None and op.owned:
                    await op.own(self.policies, ctx.identity, ctx.body, attempt.response_id)
                if tap is not None:
                    tap.stream(opened.first)
                await client.commit(answer_headers, opened.first, last=state.done)
                while not state.done and state.error is None:
                    complete = await opened.next_events(scan_)
                    if not complete:
                        break
                    if state.malformed:
                        # The well-formed events before the bad one still belong to the client.
                        await client.write((well_formed_prefix if op is None else op.well_formed_prefix)(complete))
                        break
                    if tap is not None:
                        tap.stream(complete)
                    await client.write(complete)
                    attempt.events = state.events if op is None else attempt.events + complete.count(b"data:")
                    if recorded is not None:
                        recorded.append(complete)
        except ClientGone:
            attempt.outcome, attempt.reason = "cancelled", "client_disconnected"
            self._end(ctx, attempt, INFO)
            kept = keep_for_followers(tap, opened)
            return client.response
        except asyncio.CancelledError:  # the client went away, or the request's deadline passed
            if attempt.ended is None:
                self._cancelled(ctx, attempt)
            kept = keep_for_followers(tap, opened)
            raise
        except TimeoutError:
            return await self._broken(ctx, attempt, client, "timeout", f"not complete in {provider.total_s:g}s")
        except UpstreamError as exc:
            failure = _upstream_failure(exc)
            return await self._broken(ctx, attempt, client, failure.reason, failure.detail)
        finally:
            # Past [DONE] the stream's content is all here; its last empty chunk may still be on the way.
            if not kept:
                resp.release(drain=state.done)
        attempt.usage, attempt.finish_reasons = state.usage, state.finish_reasons
        if recorded is not None:
            attempt.content = (output_from_stream if op is None else op.content)(b"".join(recorded))
        if state.malformed:
            return await self._broken(ctx, attempt, client, "malformed", state.malformed)
        if state.error is not None:
            if state.error_in_chunk:  # x_groq.error rode in an ordinary chunk: clients would not raise on it
                return await self._broken(ctx, attempt, client, "upstream_error_event", _describe(state.error))
            attempt.outcome, attempt.reason = "failed_after_commit", "upstream_error_event"
            attempt.detail = _describe(state.error)
            self.cooldowns.failed(attempt.target.key)
            self._end(ctx, attempt, WARNING)
            return await client.finish()
        if not state.done:
            if state.finish_reasons and not splitter.tail.strip():
                # It ended cleanly, on a whole event, after its finish chunk: the answer is complete, only the
                # end marker is missing. The client gets one, as OpenAI ends every stream.
                self._answered(ctx, attempt)
                return await client.finish(DONE_EVENT)
            return await self._broken(ctx, attempt, client, "upstream_closed", "the upstream closed the stream early")
        self._answered(ctx, attempt)
        return await client.finish()

    async def _broken(self, ctx, attempt: Attempt, client: ClientStream, reason: str, detail: str):
        """A failure after the commit point: one error event, then the stream ends."""
        attempt.outcome, attempt.reason, attempt.detail = "failed_after_commit", reason, detail
        self.cooldowns.failed(attempt.target.key)
        self._end(ctx, attempt, WARNING)
        error = ProxyError(
            502,
            f"{attempt.target.key} failed mid-stream: {detail} (request {ctx.request_id})",
            type="server_error",
            code=reason,
        )
        return await client.finish(_op_event(ctx, error) or error.sse_event())

    # --- bookkeeping ------------------------------------------------------------------------------------

    def _answer_headers(self, ctx: RequestContext, attempt: Attempt) -> dict[str, str]:
        return {
            # For the auto model, the tier chosen (the body keeps the upstream's own model name).
            "x-groq-proxy-model": ctx.route.virtual if ctx.auto else attempt.target.model,
            "x-groq-proxy-provider": attempt.target.provider,
            "x-groq-proxy-attempts": str(ctx.sent_attempts),
        }

    def _passed_back(self, ctx, attempt: Attempt, status: int, body: bytes, resp) -> web.Response:
        """A 4xx caused by the request itself: the client gets the upstream's answer unchanged."""
        attempt.outcome = "passed_back"
        self._end(ctx, attempt, INFO)
        headers = {**ctx.base_headers, **self._answer_headers(ctx, attempt), **_passed_on(resp.headers)}
        if ctx.policy is not None and ctx.policy.headers:
            headers.update(ctx.policy.headers)
        headers["Content-Type"] = resp.headers.get("content-type", "application/json")
        return web.Response(status=status, body=redact(body.decode(errors="replace")).encode(), headers=headers)

    def _answered(self, ctx: RequestContext, attempt: Attempt) -> None:
        attempt.outcome = "answered"
        ctx.answered = attempt
        self.cooldowns.succeeded(attempt.target.key)
        self._end(ctx, attempt, INFO)
        # What the router orders chains by: time to the first data event of a stream, all of a plain answer.
        done = attempt.first_byte if ctx.stream else attempt.ended
        if done is not None:
            self.routing.observed.add(attempt.target.key, ctx.stream, (done - attempt.started) * 1000.0)

    def _fell_over(self, ctx: RequestContext, attempt: Attempt, failure: AttemptFailed, provider: Provider) -> None:
        attempt.outcome, attempt.reason, attempt.detail = "fell_over", failure.reason, failure.detail
        attempt.status, attempt.retry_after = failure.status or attempt.status, failure.retry_after
        status = attempt.status
        pool = self.routing.pools[attempt.target.provider]
        rested = None
        if status == 429 and (failure.retry_after or len(pool) > 1):
            rested = failure.retry_after or self.routing.key_rest_s  # this model with this key
            self.routing.limits.rest(attempt.target.key, attempt.key, rested)
        elif status in (401, 403) and len(pool) > 1:
            rested = self.routing.key_rest_s  # this key, on every model
            pool.rest(attempt.key, rested)
        if rested is not None and len(pool) > 1:  # the key's failure, not the model's: no cool-down
            self._end(ctx, attempt, WARNING, key_rest_s=round(rested, 3))
            return
        cooldown = self.cooldowns.failed(attempt.target.key, failure.retry_after)
        self._end(ctx, attempt, WARNING, cooldown_s=round(cooldown, 3) if cooldown else None)

    def _skip(self, ctx: RequestContext, index: int, target, reason: str, detail: str, wait: float,
              key: int = 0, key_name: str = "") -> Attempt:
        """A model (or one of its keys) not sent this request: recorded as an attempt that was skipped."""
        attempt = Attempt(index, target, key, key_name)
        ctx.attempts.append(attempt)
        attempt.outcome, attempt.reason, attempt.detail = "skipped", reason, detail
        attempt.retry_after = wait
        self._end(ctx, attempt, INFO)
        return attempt

    def _end(self, ctx: RequestContext, attempt: Attempt, level: int, **extra) -> None:
        attempt.ended = time.perf_counter()
        self._log_attempt(ctx, attempt, level, **extra)
        self.observer.attempt_ended(ctx, attempt)

    def _log_attempt(self, ctx: RequestContext, attempt: Attempt, level: int, **extra) -> None:
        fields = {
            "request_id": ctx.request_id,
            "requested": ctx.route.requested,
            "attempt": attempt.index,
            "target": attempt.target.key,
            "outcome": attempt.outcome,
            "status": attempt.status,
            "ms": round(attempt.elapsed_ms, 2),
        }
        if attempt.reason:
            fields["reason"] = attempt.reason
            fields["detail"] = redact(attempt.detail) if attempt.detail else attempt.detail
        if attempt.key_name:
            fields["key"] = attempt.key_name  # the variable's name, never its value
        if attempt.hedge:
            fields["hedge"] = True
        if attempt.outcome == "fell_over" or attempt.outcome == "skipped":
            following = ctx.chain[attempt.index + 1 :]
            fields["next"] = following[0].key if following else None
        if ctx.identity is not None:  # with policies or [auth]: who asked and what for
            fields["key_id"], fields["request_type"], fields["module"] = ctx.identity.key, ctx.request_type, ctx.module
        fields.update((k, v) for k, v in extra.items() if v is not None)
        emit(level, "attempt", **fields)


class _Opened:
    """A stream up to its commit point: the response, the first data event (with whatever came with it) read
    and scanned, when the attempt started (its timeout_s counts from there), and whose attempt it is."""

    __slots__ = ("resp", "splitter", "first", "state", "start", "ctx", "attempt", "provider")

    def __init__(self, resp, splitter: EventSplitter, first: bytes, state: StreamState, start: float,
                 ctx: RequestContext, attempt: Attempt, provider: Provider) -> None:
        self.resp, self.splitter, self.first, self.state, self.start = resp, splitter, first, state, start
        self.ctx, self.attempt, self.provider = ctx, attempt, provider

    async def next_events(self, scan) -> bytes:
        """The next whole events of the stream, read and scanned into its state by `scan`; b"" when the
        upstream ended it. The one read loop of a stream past its commit point: the client's and the
        followers' (proxy/pipeline/tap.py)."""
        resp, splitter, state = self.resp, self.splitter, self.state
        while True:
            chunk = await resp.readany()
            if not chunk:
                return b""
            complete = splitter.feed(chunk)
            if complete:
                scan(complete, state)
                return complete


def _answer_items(obj, member: str, what: str) -> list:
    """The `member` list of a 200 that is an answer: a JSON object without `error`, whose `member` is a
    non-empty list. Anything else is not `what`: AttemptFailed."""
    if not isinstance(obj, dict):
        raise AttemptFailed("malformed", "200 with a body that is not a JSON object")
    if "error" in obj:
        raise AttemptFailed("malformed", f"200 with an error: {_describe(obj['error'])}")
    items = obj.get(member)
    if not isinstance(items, list) or not items:
        raise AttemptFailed("malformed", f"200 without {member}: not {what}")
    return items


def _completion_choices(obj) -> list[dict]:
    """The choices of a 200 that is a chat completion, each an object with a `message` object."""
    choices = _answer_items(obj, "choices", "a chat completion")
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise AttemptFailed("malformed", "200 with a choice that has no message: not a chat completion")
    return choices


def _check_embeddings(obj) -> None:
    """A 200 that is an embeddings answer: its `data` items are objects each with an `embedding`."""
    for item in _answer_items(obj, "data", "an embeddings list"):
        if not isinstance(item, dict) or "embedding" not in item:
            raise AttemptFailed("malformed", "200 with a data item that has no embedding")


def _error_event(status: int, body: bytes, op=None) -> bytes:
    """An upstream error body as one SSE event: compact JSON on one `data:` line, whatever its layout (or the
    operation's own error event)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not (isinstance(obj, dict) and "error" in obj):
        text = body.decode(errors="replace").strip()[:500] or f"upstream answered {status}"
        obj = ProxyError(status, text).body()
    if op is not None:
        error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        event = op.error_event(ProxyError(status, str(error.get("message")), code=error.get("code")), 0)
        return redact(event.decode()).encode()
    return b"data: " + redact(orjson.dumps(obj).decode()).encode() + b"\n\n"


def _op_event(ctx: RequestContext, error: ProxyError) -> bytes | None:
    """The error event of the request's operation (the Responses API's own); None for chat and embeddings.
    Numbered after the last event the client got: the stream state of the attempt forwarded, if one was."""
    if ctx.op is None:
        return None
    sent = next((a.stream for a in ctx.attempts if a.stream is not None), None)
    return ctx.op.error_event(error, getattr(sent, "sequence", 0))


def _describe(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)[:200]
    return str(error)[:200]


_RATE_REASONS = frozenset({"rate_limited", "cooldown", "rate_limit_predicted"})


def all_failed_error(ctx: RequestContext) -> ProxyError:
    """Every model failed or was skipped: one error that lists each attempt, with the status that fits."""
    attempts = ctx.attempts
    parts = []
    for a in attempts:
        if a.outcome == "skipped":
            parts.append(f"{a.target.key}: skipped ({a.detail})")
        else:
            parts.append(f"{a.target.key}: {a.detail} after {a.elapsed_ms:.0f} ms")
    name = ctx.route.virtual or ctx.route.requested
    message = redact(f"All {len(ctx.chain)} model(s) for `{name}` failed (request {ctx.request_id}): " + "; ".join(parts))
    waits = [a.retry_after for a in attempts if a.retry_after]
    sent = [a for a in attempts if a.sent]  # empty when nothing could be sent (keys resting, policy skips)
    rate_limited = all(a.reason in _RATE_REASONS for a in attempts)
    if rate_limited:  # a retry-after only when a model said when (a made-up one would mislead the client)
        headers = {"retry-after": str(max(1, math.ceil(min(waits))))} if waits else {}  # never before then
        return ProxyError(
            429, message, type="rate_limit_error", code="rate_limit_exceeded",
            headers={**headers, "x-should-retry": "true"},
        )
    if not sent:  # nothing could be sent: every key resting, or a policy skipped what was not cooling down
        status = 503
    elif all(a.reason in ("first_byte_timeout", "timeout") for a in sent):
        status = 504
    elif all(a.reason in ("connect_error", "connect_timeout") for a in sent):
        status = 503
    else:
        status = 502
    # The proxy already tried every model: a client retry would only multiply the load.
    return ProxyError(status, message, type="server_error", code="all_models_failed", headers={"x-should-retry": "false"})
