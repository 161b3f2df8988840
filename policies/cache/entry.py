"""One cached answer, held in the shapes it is replayed in, so a hit writes bytes made at store time.

An entry keeps three byte strings: the plain answer (`chat.completion` JSON), the stream's data events (each
original chunk byte for byte, one `data: ...` event each, without the usage-only chunk and without `[DONE]`),
and one usage chunk. From them it precomputes the two streamed replies (with and without the usage chunk,
both ending in `[DONE]`). An answer that came streamed gets its plain form by assembling the deltas; an
answer that came plain gets a stream (a role chunk, one content chunk, the finish chunk), so either shape
of request is served from either shape of answer (`logprobs` included: concatenated into the assembled choice,
or one chunk per token of a plain answer). Only the store step parses JSON; a hit never does.
"""

from __future__ import annotations

import re
import struct
import time

import orjson

DONE = b"data: [DONE]\n\n"
_HEAD = struct.Struct(">IIII")
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
FINISHED = frozenset({"stop", "length", "tool_calls"})


class Entry:
    __slots__ = ("key", "model", "who", "stored_at", "tokens", "answered_by", "plain", "events", "usage_event",
                 "stream", "stream_usage", "size", "replies")

    def __init__(self, key: str, model: str, who: str, stored_at: float, tokens: int, answered_by: str,
                 plain: bytes, events: bytes, usage_event: bytes) -> None:
        self.key, self.model, self.who = key, model, who
        self.stored_at, self.tokens, self.answered_by = stored_at, tokens, answered_by
        self.plain, self.events, self.usage_event = plain, events, usage_event
        self.stream = events + DONE
        self.stream_usage = events + usage_event + DONE if usage_event else self.stream
        # What the entry holds in memory: the plain answer and both streamed replies (which share their bytes
        # with `events` only when there is no usage chunk).
        self.size = len(plain) + len(self.stream) + (len(self.stream_usage) if usage_event else 0) + 200
        # The last hit's reply of each shape (plain, stream, stream with usage) with its whole-second age: hits
        # within the same second share one (immutable) decision instead of building their own.
        self.replies: list = [None, None, None]

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.stored_at)

    # --- the wire form (the Redis store) ----------------------------------------------------------------

    def dumps(self) -> bytes:
        meta = orjson.dumps([self.key, self.model, self.who, self.stored_at, self.tokens, self.answered_by])
        return b"".join((_HEAD.pack(len(meta), len(self.plain), len(self.events), len(self.usage_event)), meta,
                         self.plain, self.events, self.usage_event))

    @classmethod
    def loads(cls, blob: bytes) -> "Entry":
        n_meta, n_plain, n_events, n_usage = _HEAD.unpack_from(blob)
        at = _HEAD.size
        meta = orjson.loads(blob[at:at + n_meta])
        at += n_meta
        plain = blob[at:at + n_plain]
        at += n_plain
        events = blob[at:at + n_events]
        at += n_events
        usage = blob[at:at + n_usage]
        if at + n_usage != len(blob):
            raise ValueError("a cache entry of the wrong length")
        key, model, who, stored_at, tokens, answered_by = meta
        return cls(key, model, who, stored_at, tokens, answered_by, plain, events, usage)


def _tokens(usage) -> int:
    if not isinstance(usage, dict):
        return 0
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


def _usage_chunk(first: dict, usage: dict) -> bytes:
    chunk = {"id": first.get("id"), "object": "chat.completion.chunk", "created": first.get("created"),
             "model": first.get("model"), "choices": [], "usage": usage}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def split_events(data: bytes) -> list[bytes]:
    """The data events of SSE bytes made of whole events, each as `data: ...\\n\\n`; comments, `[DONE]` and
    blank lines are dropped."""
    out = []
    for event in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        if event.startswith(b"data:") and not event[5:].strip() == b"[DONE]":
            out.append(event + b"\n\n")
    return out


def is_usage_chunk(event: bytes) -> bool:
    """The chunk a stream ends with when `stream_options.include_usage` asks: no choices, the usage."""
    return b'"usage"' in event and _EMPTY_CHOICES.search(event) is not None


def from_stream(key: str, model: str, who: str, answered_by: str, events: list[bytes]) -> Entry | None:
    """An entry from a streamed answer's data events (as `split_events` gives them); None when they are not a
    whole single-choice answer that finished."""
    kept, usage_event, usage = [], b"", None
    first: dict | None = None
    message: dict = {"role": "assistant", "content": None}
    content: list[str] = []
    tools: dict[int, dict] = {}
    logprobs: dict[str, list] = {}  # each chunk's logprobs lists (`content`, `refusal`), concatenated in order
    finish = None
    x_groq: dict = {}
    for event in events:
        try:
            obj = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or "error" in obj:
            return None
        if is_usage_chunk(event):
            usage, usage_event = obj.get("usage"), event  # the upstream's own usage chunk, replayed as it came
            continue
        kept.append(event)
        if first is None:
            first = obj
        groq = obj.get("x_groq")
        if isinstance(groq, dict):
            if isinstance(groq.get("usage"), dict):
                usage = usage or groq["usage"]
            x_groq.update((k, v) for k, v in groq.items() if k != "usage")
        if isinstance(obj.get("usage"), dict):
            usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                return None  # several choices are never stored
            delta = choice.get("delta") or {}
            if delta.get("role"):
                message["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = tools.setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    slot["id"] = call["id"]
                if call.get("type"):
                    slot["type"] = call["type"]
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            chunk_logprobs = choice.get("logprobs")
            if isinstance(chunk_logprobs, dict):
                for name, items in chunk_logprobs.items():
                    if isinstance(items, list):
                        logprobs.setdefault(name, []).extend(items)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    if first is None or finish not in FINISHED:
        return None
    if content or not tools:
        message["content"] = "".join(content)
    if tools:
        message["tool_calls"] = [tools[i] for i in sorted(tools)]
    plain = {"id": first.get("id"), "object": "chat.completion", "created": first.get("created"),
             "model": first.get("model"),
             "choices": [{"index": 0, "message": message, "logprobs": logprobs or None, "finish_reason": finish}]}
    if usage is not None:
        plain["usage"] = usage
        usage_event = usage_event or _usage_chunk(first, usage)
    if first.get("system_fingerprint") is not None:
        plain["system_fingerprint"] = first["system_fingerprint"]
    if x_groq:
        plain["x_groq"] = x_groq
    return Entry(key, model, who, time.time(), _tokens(usage), answered_by, orjson.dumps(plain), b"".join(kept),
                 usage_event)


def from_plain(key: str, model: str, who: str, answered_by: str, body: bytes) -> Entry | None:
    """An entry from a plain answer's body; None when it is not a whole single-choice answer that finished."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    finish = choice.get("finish_reason")
    message = choice.get("message")
    if finish not in FINISHED or not isinstance(message, dict):
        return None
    base = {"id": obj.get("id"), "object": "chat.completion.chunk", "created": obj.get("created"),
            "model": obj.get("model")}
    if obj.get("system_fingerprint") is not None:
        base["system_fingerprint"] = obj["system_fingerprint"]

    def chunk(delta: dict, finish_reason=None, logprobs=None, **extra) -> bytes:
        c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
             **extra}
        return b"data: " + orjson.dumps(c) + b"\n\n"

    events = [chunk({"role": message.get("role") or "assistant", "content": ""})]
    delta: dict = {}
    logprobs = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else None
    tokens = _tokens_of(message.get("content"), logprobs)
    if tokens is not None:  # one chunk per token with its own logprobs, as the stream would have come
        events += [chunk({"content": t["token"]}, logprobs={"content": [t]}) for t in tokens]
    elif message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    if delta:
        events.append(chunk(delta, logprobs=logprobs if tokens is None else None))
    usage = obj.get("usage")
    extra = {}
    if isinstance(obj.get("x_groq"), dict):
        extra["x_groq"] = {**obj["x_groq"], **({"usage": usage} if usage else {})}
    events.append(chunk({}, finish, **extra))
    usage_event = _usage_chunk(obj, usage) if isinstance(usage, dict) else b""
    return Entry(key, model, who, time.time(), _tokens(usage), answered_by, body, b"".join(events), usage_event)


def _tokens_of(content, logprobs: dict | None) -> list[dict] | None:
    """The `logprobs.content` entries of a plain answer when their tokens spell its content exactly (so each can
    ride its own chunk); None otherwise (the logprobs then ride the one content chunk whole)."""
    tokens = logprobs.get("content") if logprobs is not None else None
    if not content or not isinstance(tokens, list) or not tokens or len(logprobs) > 2 or logprobs.get("refusal"):
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("token"), str) for t in tokens):
        return None
    return tokens if "".join(t["token"] for t in tokens) == content else None
