"""A canned Groq-like upstream for the benchmark: fixed bytes, as little CPU as possible.

It shares two cores with the load generator and the proxy, so every microsecond it spends is taken from the
proxy's figures. Hence a raw asyncio protocol on uvloop instead of aiohttp: it parses just enough HTTP/1.1
(request line, Content-Length, keep-alive, pipelining) to answer `POST .../chat/completions` with
pre-built responses: a Groq-style JSON completion, or, when the body asks for `"stream": true`, a complete
SSE stream (role chunk, content chunks, a finish chunk carrying `x_groq.usage`, `data: [DONE]`).
`GET .../models` answers a catalogue naming the bench models; anything else is a 404.

    python -m bench.canned_upstream --port 0     # prints "listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import asyncio
import re
import sys

import orjson

from bench import serving

MODELS = ("openai/gpt-oss-20b", "openai/gpt-oss-120b")
MODEL = MODELS[0]
CREATED = 1764115200
USAGE = {
    "queue_time": 0.051,
    "prompt_tokens": 75,
    "prompt_time": 0.004,
    "completion_tokens": 9,
    "completion_time": 0.009,
    "total_tokens": 84,
    "total_time": 0.013,
}
WORDS = ("Hello", "!", " How", " can", " I", " help", " you", " today", "?")

# Headers Groq sends that the proxy looks at or passes on (rate-limit view, region, request id).
_GROQ_HEADERS = (
    b"x-ratelimit-limit-requests: 1000\r\n"
    b"x-ratelimit-limit-tokens: 250000\r\n"
    b"x-ratelimit-remaining-requests: 999\r\n"
    b"x-ratelimit-remaining-tokens: 249916\r\n"
    b"x-ratelimit-reset-requests: 86.4ms\r\n"
    b"x-ratelimit-reset-tokens: 20ms\r\n"
    b"x-groq-region: bench\r\n"
    b"x-request-id: req_01bench0000000000000000000\r\n"
)


def completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench-0000000000000000000000",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(WORDS),
                        "reasoning": "The user greets; answer with a short greeting.",
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
            "usage_breakdown": None,
            "system_fingerprint": "fp_bench00000",
            "x_groq": {"id": "req_01bench0000000000000000000"},
            "service_tier": "on_demand",
        }
    )


def _chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
    obj = {
        "id": "chatcmpl-bench-0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench00000",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    obj.update(extra)
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_events() -> list[bytes]:
    """The events of one complete stream, each ending in a blank line."""
    events = [_chunk({"role": "assistant", "content": ""}, x_groq={"id": "req_01bench0000000000000000000"})]
    events += [_chunk({"content": w}) for w in WORDS]
    events.append(_chunk({}, "stop", x_groq={"id": "req_01bench0000000000000000000", "usage": USAGE}))
    events.append(b"data: [DONE]\n\n")
    return events


def models_body() -> bytes:
    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "bench", "active": True} for m in MODELS]
    return orjson.dumps({"object": "list", "data": data})


def _response(status: bytes, content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


def _chunked_response(content_type: bytes, events: list[bytes], extra: bytes = b"") -> bytes:
    """The stream framed as Groq frames it: chunked, one chunk per event, all in one write."""
    framed = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\n"
        b"transfer-encoding: chunked\r\n" + extra + b"\r\n" + framed
    )


class Canned:
    """Every response the upstream can give, built once."""

    def __init__(self, chunked: bool = False) -> None:
        self.completion = _response(b"200 OK", b"application/json", completion_body(), _GROQ_HEADERS)
        sse_headers = b"cache-control: no-cache\r\n" + _GROQ_HEADERS
        events = stream_events()
        if chunked:
            self.stream = _chunked_response(b"text/event-stream", events, sse_headers)
        else:
            self.stream = _response(b"200 OK", b"text/event-stream", b"".join(events), sse_headers)
        self.models = _response(b"200 OK", b"application/json", models_body())
        self.not_found = _response(
            b"404 Not Found", b"application/json",
            b'{"error":{"message":"Unknown path","type":"invalid_request_error","code":"unknown_url"}}',
        )
        self.bad_request = _response(b"400 Bad Request", b"text/plain", b"bad request", b"connection: close\r\n")


_STREAM = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("canned", "transport", "buffer")

    def __init__(self, canned: Canned) -> None:
        self.canned = canned
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        close = False
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buffer[:head_end]
            match = _CONTENT_LENGTH.search(head)
            if match is None and _CHUNKED.search(head):  # chunked request bodies are not supported
                out.append(self.canned.bad_request)
                close = True
                break
            length = int(match.group(1)) if match else 0
            end = head_end + 4 + length
            if len(buffer) < end:
                break
            body = buffer[head_end + 4 : end]
            buffer = buffer[end:]
            out.append(self.answer(head, body))
            if _CLOSE.search(head):
                close = True
                break
        self.buffer = buffer
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()

    def answer(self, head: bytes, body: bytes) -> bytes:
        line_end = head.find(b"\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(b" ")
        if len(parts) != 3:
            return self.canned.bad_request
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method == b"POST" and target.endswith(b"/chat/completions"):
            return self.canned.stream if _STREAM.search(body) else self.canned.completion
        if method == b"GET" and target.endswith(b"/models"):
            return self.canned.models
        return self.canned.not_found


async def serve(host: str, port: int, chunked: bool = False) -> asyncio.AbstractServer:
    """The upstream on the running loop (for use in-process)."""
    canned = Canned(chunked)
    return await serving.create_server(lambda: UpstreamProtocol(canned), host, port)


def main(argv: list[str] | None = None) -> int:
    parser = serving.parser("python -m bench.canned_upstream", __doc__)
    parser.add_argument("--chunked", action="store_true", help="frame streams chunked, as Groq does")
    args = parser.parse_args(argv)
    canned = Canned(args.chunked)
    return serving.serve_forever(lambda: UpstreamProtocol(canned), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
