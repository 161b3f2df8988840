"""OpenAI-shaped errors: the one way this proxy tells a client something went wrong.

openai-python reads `body["error"]` into `.message/.type/.param/.code`, so the wrapper is kept even for
errors the proxy makes itself.
"""

from __future__ import annotations

import os
import random

import orjson
from aiohttp import web

from proxy.pipeline.whole_answer import whole_answer


_ids = random.Random()  # seeded from os.urandom, and again in a forked child: no two processes share a sequence
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """`req_` and 24 hex digits: the id of one request in its answer's x-request-id, its log lines and trace.
    96 random bits make it unique; they need not be unguessable (it is no credential), so they come from a
    seeded generator in the process, not a getrandom system call per request."""
    return "req_%024x" % _ids.getrandbits(96)


class ProxyError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers, body = self._parts(extra_headers)
        return web.Response(status=self.status, body=body, headers=headers)

    def to_answer(self, extra_headers: dict[str, str] | None = None):
        """`to_response` as one write (proxy.pipeline.whole_answer): the request path's errors, a 429 of a flood
        of them included, cost what a cache hit's answer does."""
        headers, body = self._parts(extra_headers)
        return whole_answer(self.status, headers, body) or web.Response(status=self.status, body=body, headers=headers)

    def _parts(self, extra_headers: dict[str, str] | None) -> tuple[dict[str, str], bytes]:
        headers = dict(self.headers)
        if extra_headers:
            headers.update(extra_headers)
        headers.setdefault("Content-Type", "application/json")
        return headers, orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as one SSE event: how a failure is told after the stream's 200 has gone out."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)
