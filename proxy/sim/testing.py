"""Test helpers that ship with the package: a scripted upstream whose behaviour is chosen per model, and
hand-written upstreams for what a script does not cover.

Each real model name maps to a `Behaviour`; the upstream records every request it receives (headers and
parsed body) so tests can check what the proxy sent. Used by the test suite and the benchmark.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
from aiohttp import web


def chat_chunk(model: str, content: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    chunk = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    chunk.update(extra)
    return chunk


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def stream_events(model: str, words=("Hello", " there", "!")) -> list[bytes]:
    """A complete Groq-style stream: role chunk, one chunk per word, finish chunk with x_groq usage, [DONE]."""
    events = [sse(chat_chunk(model, "", x_groq={"id": "req_test"}) | {"choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})]
    events += [sse(chat_chunk(model, w)) for w in words]
    events.append(sse(chat_chunk(model, None, "stop", x_groq={"id": "req_test", "usage": USAGE})))
    events.append(b"data: [DONE]\n\n")
    return events


def completion(model: str, content: str = "Hello there!") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": USAGE,
        "x_groq": {"id": "req_test"},
    }


@dataclass
class Behaviour:
    """How the scripted upstream answers one model.

    kind: ok | status | hang | cut | error_event | malformed | close | slow_first
    """

    kind: str = "ok"
    status: int = 200
    body: dict | bytes | None = None
    headers: dict = field(default_factory=dict)
    events: list[bytes] | None = None  # for streams: the exact bytes of each chunk written
    cut_after: int = 2  # for cut / error_event / malformed: chunks written first
    delay_s: float = 0.0  # hang / slow_first: wait before answering


def ok() -> Behaviour:
    return Behaviour("ok")


def status(code: int, error_code: str | None = None, message: str = "upstream says no", **headers) -> Behaviour:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": error_code}}
    return Behaviour("status", status=code, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})


class ChatUpstream:
    """Base of a hand-written test upstream: a subclass defines `_chat`; `app()` serves it where the proxy posts."""

    path = "/openai/v1/chat/completions"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.path, self._chat)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class LateEndUpstream(ChatUpstream):
    """Streams a whole answer chunked, [DONE] included, then after `late_s` sends `tail` and the chunked end, as
    a server may when its last write and its end of message are separate. With `late_s` None the end never
    comes: the handler waits until the client gives the connection up. Records the connection of each request."""

    def __init__(self, late_s: float | None, tail: bytes = b"") -> None:
        self.late_s = late_s
        self.tail = tail
        self.events = b"".join(stream_events("m1"))
        self.peers: list = []

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.peers.append(request.transport.get_extra_info("peername"))
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(self.events)
        if self.late_s is None:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.01)
            return response
        await asyncio.sleep(self.late_s)
        if self.tail:
            await response.write(self.tail)
        await response.write_eof()
        return response


class ScriptedUpstream:
    """An OpenAI-style upstream: `behaviours[model]` decides each answer; unknown models answer ok.
    `by_key[api_key][model]`, when set, decides instead for requests with that Bearer key (key checks).
    An ok answer carries its behaviour's `headers` too (rate-limit headers, say)."""

    def __init__(self, behaviours: dict[str, Behaviour] | None = None) -> None:
        self.behaviours = behaviours or {}
        self.by_key: dict[str, dict[str, Behaviour]] = {}
        self.requests: list[dict] = []  # {"path", "headers", "body", "request"}

    def _behaviour(self, request: web.Request, model) -> Behaviour:
        if self.by_key:
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            behaviour = self.by_key.get(key, {}).get(model)
            if behaviour is not None:
                return behaviour
        return self.behaviours.get(model, ok())

    def keys_sent(self) -> list[str]:
        return [r["headers"].get("Authorization", "").removeprefix("Bearer ") for r in self.requests]

    @staticmethod
    def closed(record: dict) -> bool:
        """Whether the connection a recorded request came on is closed (the proxy hung up, say)."""
        transport = record["request"].transport
        return transport is None or transport.is_closing()

    def app(self) -> web.Application:
        app = web.Application()
        for prefix in ("/openai/v1", "/v1"):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_post(prefix + "/embeddings", self._embeddings)
            app.router.add_get(prefix + "/models", self._models)
        return app

    def models_sent(self) -> list[str]:
        return [r["body"].get("model") for r in self.requests]

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1, "owned_by": "test"} for m in self.behaviours]
        return web.json_response({"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode())

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        b = self.behaviours.get(body.get("model"), ok())
        if b.kind != "ok":
            return await self._misbehave(request, b, body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        out = {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body, "request": request})
        model = body.get("model")
        b = self._behaviour(request, model)
        if b.kind == "slow_first":
            await asyncio.sleep(b.delay_s)
        elif b.kind != "ok":
            return await self._misbehave(request, b, body)
        if not body.get("stream"):
            payload = b.body if b.body is not None else completion(model)
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            return web.Response(body=data, content_type="application/json", headers={"x-request-id": "req_up", **b.headers})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-ratelimit-remaining-requests": "99",
                                           **b.headers})
        await resp.prepare(request)
        for event in b.events or stream_events(model):
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def _misbehave(self, request: web.Request, b: Behaviour, body: dict) -> web.StreamResponse:
        if b.kind == "status":
            data = b.body if isinstance(b.body, bytes) else orjson.dumps(b.body)
            return web.Response(status=b.status, body=data, content_type="application/json", headers=b.headers)
        if b.kind == "hang":
            await asyncio.sleep(b.delay_s or 3600)
            return web.Response(status=200, body=orjson.dumps(completion(body.get("model"))))
        if b.kind == "close":
            request.transport.close()
            return web.Response(status=500)
        model = body.get("model")
        events = b.events or stream_events(model)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events[: b.cut_after]:
            await resp.write(event)
        if b.kind == "error_event":
            await resp.write(sse({"error": {"message": "overloaded mid-stream", "type": "server_error"}}))
            await resp.write_eof()
        elif b.kind == "malformed":
            await resp.write(b"data: this is not json\n\n")
            await resp.write_eof()
        elif b.kind == "cut":
            await asyncio.sleep(0.01)
            request.transport.close()
        return resp
