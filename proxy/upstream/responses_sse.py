"""The scanner of a Responses API stream (`POST /responses` with `stream: true`).

A Responses stream is named events, `event: response.output_text.delta` then `data: {"type": ..., ...}`,
with no `[DONE]` at the end (one is accepted): it ends with `response.completed` (or `response.incomplete`,
an answer cut by max_output_tokens), or fails with `response.failed` or an `error` event.

The commit point is the first event past the preamble. The preamble is `response.created`,
`response.in_progress` and `response.queued`: they say a response exists, not what it is, so they are held
and a failure among them (an `error` or `response.failed` event, a cut, a timeout) falls over to the next
model. Every other event is output (`response.output_item.added`, a reasoning or text delta, ...) or the end
(`response.completed`), and the first of them goes to the client with the preamble before it. Waiting for the
first text delta instead would hold a reasoning model's whole reasoning back from the client.

The bytes go through untouched; the scanner parses the JSON of the preamble (the response's id and model)
and of the few events that end a stream (the usage, the status, the error), found by their type.
"""

from __future__ import annotations

import re

import orjson

from proxy.upstream.sse import _separator, event_object, prefix_before_malformed

PREAMBLE = frozenset({"response.created", "response.in_progress", "response.queued"})
_ENDS = frozenset({"response.completed", "response.incomplete"})
# The types worth parsing past the preamble. `"type":"error"` cannot sit inside a string of the JSON text
# (its quotes would be escaped there), and every candidate is parsed and its top-level type checked.
_MARKER = re.compile(rb'"type": ?"(?:response\.(?:completed|incomplete|failed)|error)"')
# An event's own number. A string value holds `\"`, never `"sequence_number":`, so a match is a key; the
# event's objects (a response, an item, a part) have no key of that name.
_SEQUENCE = re.compile(rb'"sequence_number": ?(\d+)')


class ResponsesState:
    """What the proxy learned from one Responses stream (the fields the pipeline reads of a chat stream)."""

    __slots__ = ("done", "usage", "finish_reasons", "error", "error_in_chunk", "response_id", "response_model",
                 "malformed", "sequence")

    def __init__(self) -> None:
        self.done = False
        self.usage: dict | None = None
        self.finish_reasons: list[str] = []  # the response's status at its end: completed or incomplete
        self.error: dict | str | None = None
        self.error_in_chunk = False  # always: a Responses stream reports errors only as events
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.malformed: str | None = None
        # The number after the last event scanned (the events scanned are the events sent): what the proxy's
        # own error event after the commit point is numbered.
        self.sequence = 0


def usage_of(usage) -> dict | None:
    """The Responses usage (input_tokens, output_tokens) with the chat names beside it, which budgets, limits,
    metrics and spans read."""
    if not isinstance(usage, dict):
        return None
    out = dict(usage)
    out["prompt_tokens"] = usage.get("input_tokens")
    out["completion_tokens"] = usage.get("output_tokens")
    return out


def _fields(event: bytes) -> tuple[bytes | None, bytes | None]:
    """The event's name (`event:` line) and data (its `data:` lines joined); None for what it lacks."""
    name = None
    data = []
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, (b"\n".join(data) if data else None)


def _type(name: bytes | None, data: bytes) -> str | None:
    if name:
        return name.decode(errors="replace")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj.get("type") if isinstance(obj, dict) else None


def commit_end(complete: bytes) -> int:
    """Where the first event past the preamble ends (the index after its blank line) in whole events; -1 when
    none has come. Comments, bare fields and `[DONE]` do not count."""
    sep = _separator(complete)
    start = 0
    while (cut := complete.find(sep, start)) >= 0:
        name, data = _fields(complete[start:cut])
        if data is not None and data != b"[DONE]" and _type(name, data) not in PREAMBLE:
            return cut + len(sep)
        start = cut + len(sep)
    return -1


def scan(complete: bytes, state: ResponsesState) -> None:
    """Inspects every event of `complete` (whole events, as `EventSplitter.feed` returns them)."""
    for event in complete.split(_separator(complete)):
        if not event:
            continue
        name, data = _fields(event)
        if data is None:
            continue
        obj = event_object(data, state, _MARKER)
        if obj is None:
            if state.done or state.malformed:
                return
            _count(data, state)
            continue  # past the preamble, an event that neither ends nor fails the stream
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            state.malformed = "event is not a Responses stream event: no type"
            return
        _count(data, state)
        _record(obj, state)
        if state.error is not None or state.done:
            return


def _count(data: bytes, state: ResponsesState) -> None:
    number = _SEQUENCE.search(data)
    state.sequence = int(number.group(1)) + 1 if number is not None else state.sequence + 1


def _record(obj: dict, state: ResponsesState) -> None:
    kind = obj["type"]
    response = obj.get("response")
    if not isinstance(response, dict):
        response = None
    if state.response_id is None and response is not None:
        state.response_id, state.response_model = response.get("id"), response.get("model")
    if kind == "error":
        state.error = {"message": obj.get("message"), "code": obj.get("code")}
    elif kind == "response.failed":
        error = response.get("error") if response is not None else None
        state.error = error or "response.failed"
    elif kind in _ENDS:
        if response is None:
            state.malformed = f"{kind} without its response"
            return
        state.usage = usage_of(response.get("usage"))
        state.finish_reasons.append(str(response.get("status") or kind.rpartition(".")[2]))
        state.done = True


def well_formed_prefix(complete: bytes) -> bytes:
    """The leading events of `complete` up to (not including) the first malformed one, bytes unchanged."""
    return prefix_before_malformed(complete, scan, ResponsesState)


def output_text(raw: bytes) -> str:
    """The text of a recorded stream, from its `response.output_text.delta` events (record_content only)."""
    text = []
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = _fields(event)
        if data is None or not data.startswith(b"{") or b"output_text.delta" not in event:
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("type") == "response.output_text.delta":
            text.append(str(obj.get("delta") or ""))
    return "".join(text)
