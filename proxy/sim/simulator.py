"""A Groq-like upstream: same routes, bodies, headers, SSE framing and error shapes.

Three jobs: the embedded default upstream when no Groq key is set, a real local server
for tests, and a load target. Answers are deterministic (the text is a function of the
messages), faults are drawn from a seeded RNG, so runs can be reproduced.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import random
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.sim.files import SimFiles

SIMULATED_HEADER = "x-groq-proxy-simulated"

PREFIXES = ("/openai/v1", "/v1")
# Groq caps max_completion_tokens per model; without a cap one request could make us
# build gigabytes.
MAX_COMPLETION_TOKENS = 65536
CONTEXT_WINDOW = 131072
EMBEDDING_DIMS = 8
# Limits shown in the x-ratelimit-* headers (Groq's free tier figures).
LIMIT_REQUESTS_PER_DAY = 14400
LIMIT_TOKENS_PER_MINUTE = 18000
# Simulated speeds for the usage timings when the config does not pace the stream.
PREFILL_TOKENS_PER_S = 20000.0
DECODE_TOKENS_PER_S = 1000.0

# owned_by by the id's vendor prefix ("openai/gpt-oss-20b" -> "OpenAI").
_OWNERS = {"openai": "OpenAI", "qwen": "Qwen", "groq": "Groq", "nomic-embed-text": "Nomic AI"}
_JSON = "application/json"


@dataclass(frozen=True)
class SimulatorConfig:
    ttft_s: float = 0.0  # delay before the first byte (headers, or the first stream chunk)
    tokens_per_s: float = 0.0  # pace of completion tokens (a plain answer waits for all of them); 0 = no wait
    completion_tokens: int = 16  # used when the request sets no max_(completion_)tokens
    rate_429: float = 0.0  # share of chat/embedding requests answered 429
    rate_5xx: float = 0.0  # share answered 503
    rate_cut: float = 0.0  # share of streams closed midway, without [DONE]
    retry_after_s: int = 2
    seed: int | None = None  # seeds the fault RNG
    models: tuple[str, ...] = (
        "openai/gpt-oss-20b",
        "openai/gpt-oss-120b",
        "qwen/qwen3.6-27b",
        "groq/compound",
        "groq/compound-mini",
        "nomic-embed-text",
        "whisper-large-v3-turbo",
        "whisper-large-v3",
        "canopylabs/orpheus-v1-english",
        "canopylabs/orpheus-arabic-saudi",
    )
    decommissioned: tuple[str, ...] = (
        "llama3-8b-8192",
        "llama3-70b-8192",
        "mixtral-8x7b-32768",
        "gemma-7b-it",
        "gemma2-9b-it",
        "llama-3.1-8b-instant",
        "llama-3.3-70b-versatile",
        "playai-tts",
        "playai-tts-arabic",
        "distil-whisper-large-v3-en",
    )

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_5xx", "rate_cut"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        if self.rate_429 + self.rate_5xx > 1.0:
            raise ValueError("rate_429 + rate_5xx must not exceed 1")
        for name in ("ttft_s", "tokens_per_s", "retry_after_s"):
            if not 0 <= getattr(self, name) < math.inf:  # nan fails too
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 1 <= self.completion_tokens <= MAX_COMPLETION_TOKENS:
            raise ValueError(
                f"completion_tokens must be between 1 and {MAX_COMPLETION_TOKENS}, "
                f"got {self.completion_tokens!r}"
            )


# --- deterministic text -------------------------------------------------------------
# A fixed pseudo-random ring of words; a request reads a window of it starting at an
# offset taken from the hash of its messages. The JSON of every word is encoded once
# here so a stream chunk is plain byte concatenation.
_VOCABULARY = (
    "the quick answer is that groq runs models on language processing units which keep "
    "weights in on-chip memory so tokens stream out at a steady pace while the proxy "
    "forwards each chunk to the client and counts usage once per request simple fast "
    "reliable gateway fallback model tier latency budget trace span retry window "
    "limit cache policy stream chunk token prompt completion result"
).split()
_RING_SIZE = 4096
_RING_WORDS = random.Random(20261126).choices(_VOCABULARY, k=_RING_SIZE)
# One encoding per distinct word, shared by the ring: 4,096 separate orjson results cost ~16 MB of RSS.
_SPACED_JSON = {word: orjson.dumps(" " + word) for word in set(_VOCABULARY)}
_RING_SPACED_JSON = [_SPACED_JSON[word] for word in _RING_WORDS]


def _window(ring: list, start: int, n: int) -> list:
    out = ring[start : start + n]
    while len(out) < n:
        out += ring[: n - len(out)]
    return out


def _word_count(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return sum(
            len(part["text"].split())
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _embedding(text: str) -> bytes:
    """Eight little-endian float32 values in [-1, 1), from a hash of the text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32).digest()
    return struct.pack(
        f"<{EMBEDDING_DIMS}f", *(n / 2**31 - 1.0 for n in struct.unpack("<8I", digest))
    )


def _go_duration(seconds: float) -> str:
    """Format like Go's time.Duration.String(), as Groq's reset headers do: "2m59.56s"."""
    centis = round(seconds * 100)
    if centis == 0:
        return "0s"
    if centis < 100:
        return f"{centis * 10}ms"
    hours, centis = divmod(centis, 360000)
    minutes, centis = divmod(centis, 6000)
    secs = f"{centis / 100:.2f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# Ids are random, but from their own RNG so they never shift the seeded fault sequence.
_ids = random.Random()


def _hex(n_bytes: int) -> str:
    return f"{_ids.getrandbits(n_bytes * 8):0{n_bytes * 2}x}"


class _ApiError(Exception):
    """A request the simulator answers with a Groq-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error: dict[str, Any] = {"message": message, "type": type_, "code": code}
        if param is not None:
            self.error["param"] = param
        self.headers = headers or {}


def _error_response(exc: _ApiError, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=exc.status,
        body=orjson.dumps({"error": exc.error}),
        content_type=_JSON,
        headers={**headers, **exc.headers},
    )


@web.middleware
async def _json_http_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    # aiohttp's own 404/405/413 answers are text/plain; clients expect the error wrapper.
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = (
                f"Unknown request URL: {request.method} {request.path}. Please check the "
                "URL for typos, or see the docs at https://console.groq.com/docs/"
            )
            error = _ApiError(404, message, code="unknown_url")
        else:
            error = _ApiError(exc.status, exc.reason)
        return _error_response(error, {SIMULATED_HEADER: "true"})


# --- request parsing: each helper returns a value or raises _ApiError ---------------


async def _read_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    return body


def _optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise _ApiError(
            400, f"'{name}' : number must be an integer between {low} and {high}", param=name
        )
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _ApiError(400, "'messages' : property 'messages' is missing", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(
            400, "'messages' : must be an array with at least 1 item", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _ApiError(
                400,
                f"'messages.{i}' : discriminator property 'role' has invalid value",
                param=f"messages.{i}",
            )
    return messages


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _ApiError(400, f"'{name}' : value must be a boolean", param=name)
    return value


class _Simulator:
    """Config, fault RNG and counters of one app; the route handlers are its methods."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._faults = random.Random(config.seed)
        self._served = 0
        self._models = frozenset(config.models)
        self._decommissioned = frozenset(config.decommissioned)
        self._model_objects = {
            model_id: {
                "id": model_id,
                "object": "model",
                "created": 1754000000,
                "owned_by": _OWNERS.get(model_id.partition("/")[0], "Groq"),
                "active": True,
                "context_window": CONTEXT_WINDOW,
            }
            for model_id in config.models
        }
        self._models_body = orjson.dumps(
            {"object": "list", "data": list(self._model_objects.values())}
        )
        self._decode_tps = config.tokens_per_s or DECODE_TOKENS_PER_S

    # -- shared pieces --

    def _next_request_id(self) -> str:
        self._served += 1
        return "req_" + _hex(13)

    def _headers(self, request_id: str, tokens: int) -> dict[str, str]:
        used = (self._served - 1) % LIMIT_REQUESTS_PER_DAY + 1
        tokens = min(tokens, LIMIT_TOKENS_PER_MINUTE)
        return {
            SIMULATED_HEADER: "true",
            "x-request-id": request_id,
            "x-groq-region": "sim",
            "x-ratelimit-limit-requests": str(LIMIT_REQUESTS_PER_DAY),
            "x-ratelimit-limit-tokens": str(LIMIT_TOKENS_PER_MINUTE),
            "x-ratelimit-remaining-requests": str(LIMIT_REQUESTS_PER_DAY - used),
            "x-ratelimit-remaining-tokens": str(LIMIT_TOKENS_PER_MINUTE - tokens),
            "x-ratelimit-reset-requests": _go_duration(used * 86400 / LIMIT_REQUESTS_PER_DAY),
            "x-ratelimit-reset-tokens": _go_duration(tokens * 60 / LIMIT_TOKENS_PER_MINUTE),
        }

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str):
            raise _ApiError(400, "'model' : property 'model' is missing", param="model")
        if model in self._decommissioned:
            raise _ApiError(
                400,
                f"The model `{model}` has been decommissioned and is no longer supported. "
                "Please refer to https://console.groq.com/docs/deprecations for a "
                "recommendation on which model to use instead.",
                code="model_decommissioned",
            )
        if model not in self._models:
            raise _ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return model

    def _draw_fault(self, model: str, tokens: int) -> None:
        cfg = self.config
        if not (cfg.rate_429 or cfg.rate_5xx):
            return
        draw = self._faults.random()
        if draw < cfg.rate_429:
            raise _ApiError(
                429,
                f"Rate limit reached for model `{model}` in organization `org_simulated` "
                f"service tier `on_demand` on tokens per minute (TPM): Limit "
                f"{LIMIT_TOKENS_PER_MINUTE}, Used {LIMIT_TOKENS_PER_MINUTE}, Requested "
                f"{tokens}. Please try again in {cfg.retry_after_s}s.",
                type_="tokens",
                code="rate_limit_exceeded",
                headers={"retry-after": str(cfg.retry_after_s)},
            )
        if draw < cfg.rate_429 + cfg.rate_5xx:
            raise _ApiError(
                503,
                "The server is temporarily overloaded. Please try again later.",
                type_="internal_server_error",
                code="service_unavailable",
            )

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        prompt_time = round(prompt_tokens / PREFILL_TOKENS_PER_S, 6)
        completion_time = round(completion_tokens / self._decode_tps, 6)
        return {
            "queue_time": round(self.config.ttft_s, 6),
            "prompt_tokens": prompt_tokens,
            "prompt_time": prompt_time,
            "completion_tokens": completion_tokens,
            "completion_time": completion_time,
            "total_tokens": prompt_tokens + completion_tokens,
            "total_time": round(prompt_time + completion_time, 6),
        }

    # -- routes --

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._models_body, content_type=_JSON, headers={SIMULATED_HEADER: "true"}
        )

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        model = self._model_objects.get(model_id)
        if model is None:
            error = _ApiError(
                404,
                f"The model `{model_id}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
            return _error_response(error, {SIMULATED_HEADER: "true"})
        return web.Response(
            body=orjson.dumps(model), content_type=_JSON, headers={SIMULATED_HEADER: "true"}
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        request_id = self._next_request_id()
        try:
            body = await _read_object(request)
            model = self._check_model(body)
            messages = _messages(body)
            n = body.get("n")
            if n is not None and (isinstance(n, bool) or n != 1):
                raise _ApiError(400, "'n' : number must be at most 1", param="n")
            stream = _bool(body, "stream")
            limit = _optional_int(body, "max_completion_tokens", 1, MAX_COMPLETION_TOKENS)
            if limit is None:
                limit = _optional_int(body, "max_tokens", 1, MAX_COMPLETION_TOKENS)
            prompt_tokens = sum(4 + _word_count(m.get("content")) for m in messages)
            self._draw_fault(model, prompt_tokens)
        except _ApiError as exc:
            return _error_response(exc, self._headers(request_id, 0))

        completion_tokens = limit or self.config.completion_tokens
        seed = zlib.crc32(orjson.dumps(messages))
        offset = seed % _RING_SIZE
        words = _window(_RING_WORDS, offset, completion_tokens)
        usage = self._usage(prompt_tokens, completion_tokens)
        headers = self._headers(request_id, usage["total_tokens"])
        finish_reason = "stop" if limit is None else "length"
        completion_id = "chatcmpl-" + _hex(12)
        created = int(time.time())

        if self.config.ttft_s:
            await asyncio.sleep(self.config.ttft_s)
        if not stream:
            # Groq sends nothing of a plain answer until all of it is generated: it arrives when the same
            # answer streamed would have sent its last token.
            if self.config.tokens_per_s and completion_tokens > 1:
                await asyncio.sleep((completion_tokens - 1) / self.config.tokens_per_s)
            payload = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(words)},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": usage,
                "usage_breakdown": None,
                "system_fingerprint": "fp_sim",
                "x_groq": {"id": request_id},
            }
            return web.Response(body=orjson.dumps(payload), content_type=_JSON, headers=headers)

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        cut = bool(self.config.rate_cut) and self._faults.random() < self.config.rate_cut
        frames = _stream_frames(
            completion_id, created, model, request_id, seed, offset, completion_tokens,
            finish_reason, usage, include_usage, cut,
        )
        response = web.StreamResponse(headers={**headers, "cache-control": "no-cache"})
        response.content_type = "text/event-stream"
        try:
            await response.prepare(request)
            await _write_paced(response, frames, self.config.tokens_per_s)
        except ConnectionError:
            return response  # the client went away; nothing left to tell it
        if cut:
            # Close with the chunked body unfinished: the reader sees a truncated payload.
            response.force_close()
            if request.transport is not None:
                request.transport.close()
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        request_id = self._next_request_id()
        try:
            body = await _read_object(request)
            model = self._check_model(body)
            inputs = body.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            if (
                not isinstance(inputs, list)
                or not inputs
                or not all(isinstance(text, str) for text in inputs)
            ):
                raise _ApiError(
                    400,
                    "'input' : must be a string or a non-empty array of strings",
                    param="input",
                )
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise _ApiError(
                    400,
                    "'encoding_format' : must be one of float, base64",
                    param="encoding_format",
                )
            tokens = sum(len(text.split()) for text in inputs)
            self._draw_fault(model, tokens)
        except _ApiError as exc:
            return _error_response(exc, self._headers(request_id, 0))

        vectors = [_embedding(text) for text in inputs]
        if encoding == "base64":
            values: list[Any] = [base64.b64encode(v).decode("ascii") for v in vectors]
        else:
            values = [list(struct.unpack(f"<{EMBEDDING_DIMS}f", v)) for v in vectors]
        payload = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": value}
                for i, value in enumerate(values)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if self.config.ttft_s:
            await asyncio.sleep(self.config.ttft_s)
        return web.Response(
            body=orjson.dumps(payload),
            content_type=_JSON,
            headers=self._headers(request_id, tokens),
        )


def _stream_frames(
    completion_id: str,
    created: int,
    model: str,
    request_id: str,
    seed: int,
    offset: int,
    n_tokens: int,
    finish_reason: str,
    usage: dict[str, Any],
    include_usage: bool,
    cut: bool,
) -> list[bytes]:
    """SSE bytes grouped by send time: frame k goes out k/tokens_per_s after the first."""
    head = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_sim",
    }

    def event(**fields: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, **fields}) + b"\n\n"

    first = event(
        choices=[
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        x_groq={"id": request_id, "seed": seed},
    )
    # Token chunks differ only in their content, so they are built by concatenation
    # around one pre-encoded prefix and suffix instead of one orjson.dumps per token.
    prefix = orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": ""}}]})
    prefix = b"data: " + prefix[: prefix.rindex(b'""')]
    suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    contents = _window(_RING_SPACED_JSON, offset, n_tokens)
    contents[0] = orjson.dumps(_RING_WORDS[offset])  # no leading space on the first word
    frames = [prefix + content + suffix for content in contents]
    frames[0] = first + frames[0]
    if cut:
        return frames[: max(1, n_tokens // 2)]

    finish: dict[str, Any] = {
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}],
        "x_groq": {"id": request_id, "usage": usage},
    }
    tail = event(**finish, usage=usage) if include_usage else event(**finish)
    if include_usage:
        tail += event(choices=[], usage=usage)
    frames[-1] += tail + b"data: [DONE]\n\n"
    return frames


async def _write_paced(
    response: web.StreamResponse, frames: list[bytes], tokens_per_s: float
) -> None:
    if not tokens_per_s:
        await response.write(b"".join(frames))
        return
    # Schedule against the start time so sleep overshoot does not add up, and send every
    # frame that is already due in one write (high rates would otherwise be timer-bound).
    loop = asyncio.get_running_loop()
    start = loop.time()
    ready: list[bytes] = []
    for k, frame in enumerate(frames):
        delay = start + k / tokens_per_s - loop.time()
        if delay > 0:
            if ready:
                await response.write(b"".join(ready))
                ready = []
            await asyncio.sleep(delay)
        ready.append(frame)
    await response.write(b"".join(ready))


# --- app, server, CLI ----------------------------------------------------------------


def _api_modules() -> tuple:
    from proxy.sim import audio, responses

    return (responses, audio)


def build_simulator_app(config: SimulatorConfig = SimulatorConfig()) -> web.Application:
    simulator = _Simulator(config)
    api_modules = _api_modules()
    # Long prompts in load tests exceed aiohttp's 1 MiB default body limit.
    app = web.Application(middlewares=[_json_http_errors], client_max_size=32 * 1024**2)
    for prefix in PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", simulator.chat_completions)
        app.router.add_post(f"{prefix}/embeddings", simulator.embeddings)
        app.router.add_get(f"{prefix}/models", simulator.models)
        app.router.add_get(f"{prefix}/models/{{model:.+}}", simulator.model)
        for module in api_modules:  # the other endpoints Groq serves, one module each
            module.add_routes(app, prefix, simulator)
    SimFiles().register(app, PREFIXES)  # files and batches
    return app


async def start_simulator(
    config: SimulatorConfig = SimulatorConfig(), host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Starts it in the running loop; returns the runner (caller calls `await runner.cleanup()`)
    and the OpenAI-style base URL, e.g. "http://127.0.0.1:54321/openai/v1"."""
    # A short shutdown_timeout: an in-process upstream should not hold up shutdown for
    # a minute waiting on slow paced streams.
    runner = web.AppRunner(build_simulator_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}/openai/v1"


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimulatorConfig()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8090, help="port to listen on (default 8090)")
    add("--ttft-ms", type=float, default=d.ttft_s * 1000, help="delay before the first byte, ms")
    add("--tokens-per-s", type=float, default=d.tokens_per_s,
        help="generation pace: streams send at it, plain answers wait for it; 0 = no pacing")
    add("--completion-tokens", type=int, default=d.completion_tokens,
        help="tokens generated when the request sets no max_tokens")
    add("--rate-429", type=float, default=d.rate_429, help="share of requests answered 429")
    add("--rate-5xx", type=float, default=d.rate_5xx, help="share of requests answered 503")
    add("--rate-cut", type=float, default=d.rate_cut, help="share of streams cut midway")
    add("--retry-after", type=int, default=d.retry_after_s, help="retry-after seconds on 429")
    add("--seed", type=int, default=d.seed, help="seed of the fault RNG (reproducible runs)")


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        ttft_s=args.ttft_ms / 1000,
        tokens_per_s=args.tokens_per_s,
        completion_tokens=args.completion_tokens,
        rate_429=args.rate_429,
        rate_5xx=args.rate_5xx,
        rate_cut=args.rate_cut,
        retry_after_s=args.retry_after,
        seed=args.seed,
    )

