"""Policies the tests load from the config by "tests.policy_examples:ClassName", as an operator's would be.

`RequireModule` is the custom policy the README shows."""

from __future__ import annotations

from policies import CONTINUE, Policy, Reject, Respond, Skip


class RequireModule(Policy):
    """Refuses requests that do not say which module sent them (x-module), or name one not allowed."""

    def __init__(self, allowed: list[str], status: int = 403) -> None:
        self.allowed = frozenset(allowed)
        self.status = status
        self.seen: dict[str, int] = {}

    async def on_request(self, ctx):
        if ctx.module not in self.allowed:
            return Reject(self.status, f"x-module must be one of {sorted(self.allowed)}", code="module_not_allowed",
                          type="permission_error")
        return CONTINUE

    async def after(self, ctx):
        self.seen[ctx.module] = self.seen.get(ctx.module, 0) + 1


class Recorder(Policy):
    """Keeps who asked and what for, as the chain put it on each request's context."""

    seen: list = []

    async def on_request(self, ctx):
        self.seen.append((ctx.identity, ctx.request_type, ctx.module, ctx.virtual_model))
        return CONTINUE


class Journal(Policy):
    """Keeps the order its hooks ran in, in a list shared by every Journal of a test."""

    events: list = []

    def __init__(self, label: str, decide: str = "continue", fail_in: str = "") -> None:
        self.label, self.decide, self.fail_in = label, decide, fail_in

    async def on_request(self, ctx):
        self.events.append(("on_request", self.label))
        if self.fail_in == "on_request":
            raise RuntimeError("on_request broke")
        if self.decide == "reject":
            return Reject(418, f"{self.label} says no", code="journal_said_no")
        if self.decide == "respond":
            return Respond({"answered_by": self.label})
        if self.decide == "respond_stream":
            return Respond(events=[b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"])
        return CONTINUE

    async def before_attempt(self, ctx, attempt):
        self.events.append(("before_attempt", self.label, attempt.target.model))
        if self.decide == "skip_m1" and attempt.target.model == "m1":
            return Skip("m1 is not for this request")
        return CONTINUE

    async def on_response(self, ctx, attempt):
        self.events.append(("on_response", self.label, attempt.target.model))
        return CONTINUE

    async def after(self, ctx):
        self.events.append(("after", self.label, ctx.usage))
        if self.fail_in == "after":
            raise RuntimeError("after broke")


# --- an upstream whose usage differs per request, for settlement tests ------------------------------------

import asyncio as _asyncio  # noqa: E402

import orjson as _orjson  # noqa: E402
from aiohttp import web as _web  # noqa: E402

from proxy.sim.testing import ChatUpstream, chat_chunk, completion, sse  # noqa: E402


class UsageUpstream(ChatUpstream):
    """Answers every request (plain or streamed) with usage of its own: request n reports prompt 10 + n % 7 and
    completion 5 + n % 11 tokens. Streams send `words` chunks; with `hold` set (an Event), each stream stops
    after its first chunk until the Event is set. `reported` sums what it reported, `started` counts streams."""

    def __init__(self, words: int = 3, hold: "_asyncio.Event | None" = None) -> None:
        self.words, self.hold = words, hold
        self.count = 0
        self.reported = 0
        self.started = 0

    def _usage(self) -> dict:
        n = self.count
        self.count += 1
        usage = {"prompt_tokens": 10 + n % 7, "completion_tokens": 5 + n % 11}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    async def _chat(self, request: _web.Request) -> _web.StreamResponse:
        body = _orjson.loads(await request.read())
        model = body["model"]
        usage = self._usage()
        if not body.get("stream"):
            self.reported += usage["total_tokens"]
            return _web.Response(body=_orjson.dumps({**completion(model), "usage": usage}),
                                 content_type="application/json")
        response = _web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.started += 1
        await response.write(sse(chat_chunk(model, "")))
        if self.hold is not None:
            await self.hold.wait()
        for i in range(self.words):
            await response.write(sse(chat_chunk(model, f" w{i}")))
        self.reported += usage["total_tokens"]
        await response.write(sse(chat_chunk(model, None, "stop", x_groq={"id": "req_x", "usage": usage})))
        await response.write(b"data: [DONE]\n\n")
        return response


class RememberingCache(Policy):
    """The response cache's two contracts with the status page and the request log, without its store: the
    `x-groq-proxy-cache` header on every answer it saw (HIT for a prompt answered before, MISS otherwise) and
    the `cache_stats()` hook. It answers a repeated prompt with a canned completion."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def on_request(self, ctx):
        prompt = _orjson.dumps(ctx.body.get("messages")).decode()
        if prompt in self.seen:
            return Respond(body=completion("cached"), headers={"x-groq-proxy-cache": "HIT", "age": "1"})
        ctx.policy.headers["x-groq-proxy-cache"] = "MISS"
        return CONTINUE

    async def after(self, ctx):
        if ctx.answered is not None:
            self.seen.add(_orjson.dumps(ctx.body.get("messages")).decode())

    def cache_stats(self) -> dict:
        return {"entries": len(self.seen)}


class HeadedAnswer(Policy):
    """Answers every request itself with the headers its config gives (`headers`): a policy's own headers, the
    framing's included, as they reach the client."""

    def __init__(self, headers: dict | None = None, stream: bool = False) -> None:
        self.headers = dict(headers or {})
        self.stream = stream

    async def on_request(self, ctx):
        if self.stream:
            return Respond(events=(b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"), headers=self.headers)
        return Respond(body=completion("headed"), headers=self.headers)
