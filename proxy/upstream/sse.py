"""An incremental scanner for the upstream's SSE stream.

The bytes are forwarded untouched; the scanner only says where complete events end (so a client never
receives half an event followed by our error event) and looks inside the few events the proxy needs:
usage, finish reason, errors and the end marker. JSON is parsed only for events that may hold those.

An event is held until its blank line arrives, so the upstream decides how much is held: one that never
sends a line break would be buffered for ever. `EventSplitter` holds at most `MAX_EVENT` bytes of an
unfinished event (a real chunk is a few KiB; a whole tool call's arguments rarely reach 100 KiB) and looks for
the end of an event only in the bytes that are new, so its cost is linear in what it is fed (it used to join
and search the whole held tail on every read: 150 MB without a line break took 22 s of CPU).
"""

from __future__ import annotations

import re

import orjson

from proxy.upstream.http1 import BadResponse

MAX_EVENT = 1024 * 1024  # the most bytes of one unfinished event held; past it the stream is malformed

_DONE = b"data: [DONE]\n\n"  # the end marker, as a whole event
_NEXT_DONE = b"\n\n" + _DONE  # ... as an event after another

# The keys the proxy looks for. In JSON text `"usage"` can only be a key (inside a string it is `\"usage\"`).
_MARKER = re.compile(rb'"(?:usage|error)"|"finish_reason": ?"')


class StreamState:
    """What the proxy learned from one stream; filled in as events go by."""

    __slots__ = (
        "done", "usage", "finish_reasons", "error", "error_in_chunk", "response_id", "response_model", "malformed",
    )

    def __init__(self) -> None:
        self.done = False
        self.usage: dict | None = None
        self.finish_reasons: list[str] = []
        self.error: dict | str | None = None
        self.error_in_chunk = False  # the error came as x_groq.error in a chunk, not as an error event
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.malformed: str | None = None


def _event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for a comment or a field-only event."""
    if b"\n" not in event:
        if event.startswith(b"data:"):
            return event[5:].lstrip(b" ")
        return None
    lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def event_object(data: bytes, state, marker: re.Pattern):
    """The JSON of one event's data when it is worth parsing: the stream's first event, or one that `marker`
    finds. None otherwise, with `state.done` set for `[DONE]` and `state.malformed` for data that is not a JSON
    object. Every stream scanner starts an event so (chat here, the Responses API in responses_sse.py)."""
    if data == b"[DONE]":
        state.done = True
        return None
    if not data.startswith(b"{"):
        state.malformed = f"event data is not a JSON object: {data[:60]!r}"
        return None
    if state.response_id is not None and marker.search(data) is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        state.malformed = "event data is not valid JSON"
        return None


def inspect_event(data: bytes, state: StreamState) -> None:
    """Records what one event's data says. Sets `state.malformed` for data that is not a JSON object."""
    obj = event_object(data, state, _MARKER)
    if obj is None:
        return
    if not isinstance(obj, dict):
        state.malformed = "event data is not a JSON object"
        return
    _record(obj, state)


def _record(obj: dict, state: StreamState) -> None:
    first = state.response_id is None
    if first:
        state.response_id = obj.get("id")
        state.response_model = obj.get("model")
    if "error" in obj:
        state.error = obj["error"]
        return
    choices = obj.get("choices")
    if not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)) and (first or choices is not None):
        # `{}` or `{"choices": "nope"}` is not a chunk: clients would hand it to the caller as one (choices None).
        state.malformed = "event is not a chat completion chunk: no list of choices"
        return
    usage = obj.get("usage")
    x_groq = obj.get("x_groq")
    if isinstance(x_groq, dict):
        if x_groq.get("error"):
            state.error = x_groq["error"]
            state.error_in_chunk = True
        usage = usage or x_groq.get("usage")
    # Groq repeats the usage (finish chunk, x_groq, the include_usage chunk): keep one copy, never add.
    if isinstance(usage, dict):
        state.usage = usage
    for choice in choices or ():
        reason = choice.get("finish_reason")
        if reason:
            state.finish_reasons.append(reason)


class EventTooLarge(BadResponse):
    """An event longer than MAX_EVENT: a BadResponse, so the attempt fails as `malformed` (falls over before the
    commit point, ends the stream with an error event after it)."""


class EventSplitter:
    """Cuts a byte stream at event boundaries; keeps the incomplete tail for the next chunk."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        # The start of an event whose blank line has not come (never a blank line): a bytearray once needed.
        self.tail: bytes | bytearray = b""

    def feed(self, chunk: bytes) -> bytes:
        """Returns the complete events now available (possibly b''), exactly as received. EventTooLarge when
        the unfinished event has grown past MAX_EVENT."""
        tail = self.tail
        if not tail:  # the usual case: whole events, passed on as the very bytes object that came
            end = _events_end(chunk, 0)
            if end < len(chunk):
                self.tail = bytearray(chunk[end:])
                _check(self.tail)
            return chunk[:end]
        # A blank line can only be in the new bytes, or straddle the join (a CRLF one starts 3 bytes back at most).
        start = max(len(tail) - 3, 0)
        tail += chunk
        end = _events_end(tail, start)
        if end == 0:
            _check(tail)
            return b""
        complete = bytes(tail[:end])
        del tail[:end]
        _check(tail)
        return complete


def _events_end(data: bytes | bytearray, start: int) -> int:
    """The index after the last blank line (LF or CRLF framing) that begins at `start` or later; 0 if none."""
    end = data.rfind(b"\n\n", start)
    end = end + 2 if end >= 0 else 0
    if data.find(b"\r", start) >= 0:
        crlf = data.rfind(b"\r\n\r\n", start)
        if crlf >= 0:
            end = max(end, crlf + 4)
    return end


def _check(tail: bytearray) -> None:
    if len(tail) > MAX_EVENT:
        size = len(tail)
        tail.clear()
        raise EventTooLarge(f"an event longer than {MAX_EVENT} bytes (no blank line in {size} bytes)")


_LITERAL_MARKERS = (b'"usage"', b'"error"', b'"finish_reason":"', b'"finish_reason": "')


def _marker_spans(complete: bytes) -> list[tuple[int, int]]:
    """Where the markers are, in order. Four `find` passes: cheaper over a block than the regex, whose
    alternatives all start at a quote, and JSON has a quote every few bytes."""
    spans = []
    for marker in _LITERAL_MARKERS:
        at = complete.find(marker)
        while at >= 0:
            spans.append((at, at + len(marker)))
            at = complete.find(marker, at + 1)
    spans.sort()
    return spans


def _plain_events(complete: bytes) -> tuple[bool, int]:
    """Whether every event of the block (whole events, ending in a blank line) is a one-line `data: {...}` or
    `data: [DONE]`, counted without splitting; and how many `[DONE]` events it holds.

    Exact because JSON text cannot hold a raw newline. Each counted event start but the first follows its own
    `\\n\\n`, and the block's last `\\n\\n` follows none, so the block has at least twice as many newlines
    as counted events, and exactly twice as many only when those pairs are its only newlines: when every
    event is one line and starts as counted. (Two [DONE] in a row share a pair and count once: a block that
    odd takes the careful path.)"""
    if not complete.endswith(b"\n\n"):
        return False, 0
    objects = complete.count(b"\n\ndata: {") + complete.startswith(b"data: {")
    done = complete.count(_NEXT_DONE) + complete.startswith(_DONE)
    return complete.count(b"\n") == 2 * (objects + done), done


def scan(complete: bytes, state: StreamState) -> None:
    """Inspects every event in `complete` (whole events, as `EventSplitter.feed` returns them)."""
    if b"\r" in complete:
        complete = complete.replace(b"\r\n", b"\n")
    plain, dones = _plain_events(complete)
    if not plain:
        _scan_each(complete, state)  # comments, other fields or a malformed event: look at each one
        return
    # Every event is `data: {...}` or `data: [DONE]`: parse only the first event of the stream and the events
    # that hold a marker, found by a few `find` passes over the block. Nothing after [DONE] counts.
    done_at = -1
    if dones:
        # The usual place of the one [DONE] is the end of the block: no search needed then.
        at_end = dones == 1 and complete.endswith(_DONE)
        done_at = len(complete) - len(_DONE) if at_end else complete.find(_DONE)
        complete = complete[:done_at]
    parsed = -1
    if state.response_id is None and (first := complete.find(b"data: {")) >= 0:
        # The stream's first JSON event (its start: an earlier `data: {` could only be inside its own text).
        inspect_event(complete[first + 6 : complete.find(b"\n\n", first)], state)
        if state.error is not None or state.malformed:
            return
        parsed = first
    for at, end in _marker_spans(complete):
        if state.error is not None or state.malformed:
            return
        start = complete.rfind(b"\n\n", 0, at)
        start = 0 if start < 0 else start + 2
        if start == parsed:
            continue  # another marker of an event already parsed
        parsed = start
        data = complete[start + 6 : complete.find(b"\n\n", end)]
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            state.malformed = "event data is not valid JSON"
            return
        _record(obj, state)
    if done_at >= 0 and state.error is None and not state.malformed:
        state.done = True


def _scan_each(complete: bytes, state: StreamState) -> None:
    for event in complete.split(b"\n\n"):
        if not event:
            continue
        data = _event_data(event)
        if data is not None:
            inspect_event(data, state)
            if state.malformed or state.error is not None or state.done:
                return


def _separator(complete: bytes) -> bytes:
    """The blank line that ends the block's events. LF framing, the usual one, is known by one memchr; only a
    block with a CR is searched for CRLF."""
    return b"\r\n\r\n" if b"\r" in complete and b"\r\n\r\n" in complete else b"\n\n"


def first_data_end(complete: bytes) -> int:
    """Where the first data event of whole events ends (the index after its blank line); -1 when there is
    none yet (comments and bare fields do not count)."""
    sep = _separator(complete)
    start = 0
    while (cut := complete.find(sep, start)) >= 0:
        event = complete[start:cut]
        if sep != b"\n\n":
            event = event.replace(b"\r\n", b"\n")
        if event and _event_data(event) is not None:
            return cut + len(sep)
        start = cut + len(sep)
    return -1


def has_data(complete: bytes) -> bool:
    """Whether whole events hold at least one data event (comments and bare fields do not count)."""
    return first_data_end(complete) >= 0


def well_formed_prefix(complete: bytes) -> bytes:
    """The leading events of `complete` up to (not including) the first malformed one, bytes unchanged."""
    return prefix_before_malformed(complete, scan, StreamState)


def prefix_before_malformed(complete: bytes, scanner, new_state) -> bytes:
    """The leading events of `complete` that `scanner` finds well formed, each probed with a `new_state()` past
    its stream's first event, bytes unchanged (the chat and the Responses API scanner's `well_formed_prefix`)."""
    end = 0
    sep = _separator(complete)
    while (cut := complete.find(sep, end)) >= 0:
        probe = new_state()
        probe.response_id = ""  # parse only what the markers ask for, as scan() does past the first event
        scanner(complete[end : cut + len(sep)], probe)
        if probe.malformed:
            break
        end = cut + len(sep)
    return complete[:end]
