"""Unit tests of the incremental SSE scanner: where events end, and what the proxy reads from them."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from proxy.upstream import sse as scanner
from proxy.upstream.http1 import BadResponse
from proxy.upstream.sse import EventSplitter, EventTooLarge, StreamState, has_data, inspect_event, scan
from proxy.sim.testing import USAGE, chat_chunk, sse, stream_events

OTHER_USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def events_of(frame: bytes) -> list[bytes]:
    """Whole events, each with its terminator: data, a comment, a multi-line data event, unicode, [DONE]."""
    return [
        b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"' + "héllo 世界 🚀".encode() + b'"}}]}',
        b": keep-alive",
        b"event: message" + frame[: len(frame) // 2] + b'data: {"id":"c1",' + frame[: len(frame) // 2]
        + b'data: "choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        b"data:[DONE]",
    ]


def framed(frame: bytes) -> list[bytes]:
    return [e + frame for e in events_of(frame)]


def scanned(data: bytes) -> StreamState:
    state = StreamState()
    scan(data, state)
    return state


# --- EventSplitter ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_splitter_fed_byte_by_byte_returns_each_event_whole(frame):
    events = framed(frame)
    stream = b"".join(events)
    splitter = EventSplitter()
    out = [splitter.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert [o for o in out if o] == events  # exactly the complete events, each once, unchanged
    assert splitter.tail == b""
    # An event comes out on the very byte that completes it, not later.
    ends = [i for i, o in enumerate(out) if o]
    assert [e + 1 for e in ends] == [sum(len(e) for e in events[: k + 1]) for k in range(len(events))]


@pytest.mark.parametrize("frame", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_splitter_keeps_the_tail_until_it_is_complete(frame):
    first, second = framed(frame)[:2]
    splitter = EventSplitter()
    assert splitter.feed(first + second[:5]) == first
    assert splitter.tail == second[:5]
    assert splitter.feed(b"") == b""
    assert splitter.tail == second[:5]
    assert splitter.feed(second[5:-1]) == b""  # the last byte of the blank line is still missing
    assert splitter.feed(second[-1:]) == second
    assert splitter.tail == b""


def test_splitter_holds_a_crlf_blank_line_cut_in_two():
    splitter = EventSplitter()
    assert splitter.feed(b"data: {}\r\n\r") == b""
    assert splitter.feed(b"\ndata: {") == b"data: {}\r\n\r\n"
    assert splitter.tail == b"data: {"


def test_splitter_returns_several_events_of_one_chunk_at_once():
    events = stream_events("m")
    splitter = EventSplitter()
    assert splitter.feed(b"".join(events[:3]) + events[3][:10]) == b"".join(events[:3])
    assert splitter.feed(events[3][10:] + b"".join(events[4:])) == b"".join(events[3:])
    assert splitter.tail == b""


def test_an_event_up_to_the_cap_comes_out_whole_and_one_byte_more_is_malformed():
    event = b"data: " + b"x" * (scanner.MAX_EVENT - 6)  # MAX_EVENT bytes, its blank line still to come
    splitter = EventSplitter()
    for i in range(0, len(event), 65536):
        assert splitter.feed(event[i : i + 65536]) == b""
    assert splitter.feed(b"\n\n") == event + b"\n\n"
    with pytest.raises(EventTooLarge, match=f"longer than {scanner.MAX_EVENT} bytes") as refused:
        for i in range(0, len(event), 65536):
            splitter.feed(event[i : i + 65536])
        splitter.feed(b"x")
    assert isinstance(refused.value, BadResponse)  # the pipeline's `malformed`: falls over, or an error event
    assert len(splitter.tail) == 0  # what it held is let go


def test_a_chunk_longer_than_the_cap_without_a_blank_line_is_malformed():
    splitter = EventSplitter()
    assert splitter.feed(b"data: {}\n\n") == b"data: {}\n\n"
    with pytest.raises(EventTooLarge):
        splitter.feed(b"data: {}\n\ndata: " + b"y" * scanner.MAX_EVENT)


async def test_splitting_is_linear_in_what_it_is_fed(monkeypatch):
    # 16 MiB with no line break, in 256-byte reads. Joining the held tail to each read (as it once did) copies
    # 65,536 times 8 MiB on average: minutes of CPU. Looking only at the new bytes: a fraction of a second.
    monkeypatch.setattr(scanner, "MAX_EVENT", 64 * 1024 * 1024)
    splitter = EventSplitter()
    piece = b"z" * 256

    async def feed() -> None:
        assert splitter.feed(b"data: ") == b""
        for i in range(65536):
            assert splitter.feed(piece) == b""
            if i % 256 == 0:
                await asyncio.sleep(0)  # lets the safety net below end a run that takes for ever

    await asyncio.wait_for(feed(), 120)  # only a guard against a hang: the linear version needs far less
    assert splitter.feed(b"\n\n") == b"data: " + piece * 65536 + b"\n\n"


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("frame", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
def test_splitter_in_random_chunks_gives_the_same_bytes_and_state(frame, seed):
    finish = b"data: " + orjson.dumps(chat_chunk("m", None, "stop", x_groq={"id": "r", "usage": USAGE})) + frame
    events = framed(frame)
    events.insert(-1, finish)  # before [DONE]
    stream = b"".join(events)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(stream)), 12))
    splitter, state, out = EventSplitter(), StreamState(), []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        complete = splitter.feed(stream[a:b])
        if complete:
            out.append(complete)
            complete.decode()  # whole events: never a multi-byte character cut in two
            scan(complete, state)
    assert b"".join(out) == stream and splitter.tail == b""
    whole = scanned(stream)
    assert (state.done, state.usage, state.finish_reasons, state.response_id) == (
        whole.done, whole.usage, whole.finish_reasons, whole.response_id
    )
    assert state.done and state.usage == USAGE and state.finish_reasons == ["stop", "stop"]


# --- scan: usage, finish reasons, ids ---------------------------------------------------------------------------


def test_usage_is_recorded_once_when_groq_repeats_it():
    # Finish chunk with both top-level usage (include_usage) and x_groq.usage, then the usage-only chunk.
    finish = chat_chunk("m", None, "stop", usage=USAGE, x_groq={"id": "r", "usage": USAGE})
    usage_only = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "choices": [], "usage": USAGE,
                  "x_groq": {"id": "r", "usage": USAGE}}
    state = scanned(stream_events("m")[0] + sse(finish) + sse(usage_only) + b"data: [DONE]\n\n")
    assert state.usage == USAGE  # the same numbers, not two or three times them
    assert state.finish_reasons == ["stop"]
    assert state.done


def test_usage_from_x_groq_alone_and_the_last_copy_wins():
    state = scanned(b"".join(stream_events("m")))
    assert state.usage == USAGE
    later = {"choices": [], "usage": OTHER_USAGE}
    state = scanned(b"".join(stream_events("m")[:-1]) + sse(later) + b"data: [DONE]\n\n")
    assert state.usage == OTHER_USAGE


def test_a_null_usage_does_not_erase_the_usage():
    state = scanned(sse(chat_chunk("m", None, "stop", usage=USAGE)) + sse(chat_chunk("m", "x", usage=None)))
    assert state.usage == USAGE


def test_finish_reasons_of_each_choice_in_order():
    two = chat_chunk("m", None, "length")
    two["choices"].append({"index": 1, "delta": {}, "finish_reason": "tool_calls"})
    spaced = b'data: {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}\n\n'
    state = scanned(sse(chat_chunk("m", "a")) + sse(two) + spaced)
    assert state.finish_reasons == ["length", "tool_calls", "content_filter"]
    assert state.error is None and state.malformed is None and not state.done


def test_response_id_and_model_come_from_the_first_event():
    state = scanned(sse(chat_chunk("first-model", "a") | {"id": "chatcmpl-1"})
                    + sse(chat_chunk("other", "b") | {"id": "chatcmpl-2"}))
    assert (state.response_id, state.response_model) == ("chatcmpl-1", "first-model")


def test_comments_and_field_only_events_are_ignored():
    state = scanned(b": keep-alive\n\nevent: ping\n\nretry: 100\n\n: data: [DONE]\n\n")
    assert not state.done and state.response_id is None and state.malformed is None and state.error is None


def test_multi_line_data_is_joined_before_parsing():
    event = b'data: {"id":"c9","choices":[],\ndata: "usage":' + orjson.dumps(USAGE) + b"}\n\n"
    state = scanned(event)
    assert state.response_id == "c9" and state.usage == USAGE


def test_crlf_framed_events_are_scanned():
    stream = b"".join(e.replace(b"\n", b"\r\n") for e in stream_events("m"))
    state = scanned(stream)
    assert state.done and state.usage == USAGE and state.finish_reasons == ["stop"]


# --- scan: the end, errors, malformed data -------------------------------------------------------------------


def test_done_marker():
    state = StreamState()
    inspect_event(b"[DONE]", state)
    assert state.done
    assert scanned(b"data: [DONE]\n\n").done
    assert scanned(b"data:[DONE]\r\n\r\n").done


def test_error_event_is_recorded_and_scanning_stops():
    error = {"message": "overloaded", "type": "server_error", "code": "overloaded"}
    state = scanned(sse(chat_chunk("m", "a")) + sse({"error": error}) + sse(chat_chunk("m", None, "stop"))
                    + b"data: [DONE]\n\n")
    assert state.error == error
    assert not state.error_in_chunk
    assert state.finish_reasons == [] and not state.done  # nothing after the error is taken in


def test_error_event_with_a_string():
    state = scanned(sse({"error": "upstream exploded"}))
    assert state.error == "upstream exploded"


def test_x_groq_error_inside_a_chunk():
    chunk = chat_chunk("m", None, x_groq={"id": "req_1", "error": "Service Unavailable"})
    state = scanned(sse(chat_chunk("m", "a")) + sse(chunk))
    assert state.error == "Service Unavailable"
    assert state.error_in_chunk  # an ordinary chunk: clients do not raise on it by themselves


def test_x_groq_without_error_is_no_error():
    state = scanned(sse(chat_chunk("m", "a", x_groq={"id": "req_1", "error": None})))
    assert state.error is None


@pytest.mark.parametrize(
    "data, says",
    [
        (b"this is not json", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b'"a string"', "not a JSON object"),
        (b'{"id": "c1", "choices": [', "not valid JSON"),
    ],
)
def test_malformed_data_is_reported_and_scanning_stops(data, says):
    state = scanned(b"data: " + data + b"\n\n" + b"data: [DONE]\n\n")
    assert state.malformed and says in state.malformed
    assert not state.done


def test_malformed_data_after_good_events():
    state = scanned(b"".join(stream_events("m")[:2]) + b"data: oops\n\n")
    assert state.response_id == "chatcmpl-test"
    assert "oops" in state.malformed


# --- has_data ------------------------------------------------------------------------------------------------


def test_has_data_counts_data_events_only():
    assert not has_data(b": keep-alive\n\n")
    assert not has_data(b": keep-alive\n\nevent: ping\n\n")
    assert has_data(b": keep-alive\n\ndata: {}\n\n")
    assert has_data(b"event: message\ndata: {}\n\n")
    assert has_data(b": keep-alive\r\n\r\ndata: {}\r\n\r\n")
    assert not has_data(b": keep-alive\r\n\r\n")


def _state_of(scan_fn, blocks):
    state = StreamState()
    for block in blocks:
        scan_fn(block, state)
        if state.malformed or state.error is not None or state.done:
            break  # where the pipeline stops reading
    return (state.done, state.usage, state.finish_reasons, state.error, state.response_id, state.response_model,
            bool(state.malformed), state.events)


def test_the_fast_path_and_the_careful_path_agree_on_every_block():
    """`scan` decides plain blocks by counting; `_scan_each` looks at every event. Over generated streams of
    every kind of event, cut into blocks at random event boundaries, they must learn the same things."""
    import random

    from proxy.upstream.sse import _scan_each

    kinds = [
        lambda i: b'data: {"id":"c%d","model":"m","choices":[{"index":0,"delta":{"content":"w%d"},"finish_reason":null}]}\n\n' % (i, i),
        lambda i: b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"x_groq":{"usage":' + orjson.dumps(USAGE) + b"}}\n\n",
        lambda i: b'data: {"id":"c","choices":[],"usage":' + orjson.dumps({**USAGE, "total_tokens": i}) + b"}\n\n",
        lambda i: b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"says \\"usage\\": data: {"},"finish_reason":null}]}\n\n',
        lambda i: b": keep-alive\n\n",
        lambda i: b'data: {"error":{"message":"boom"}}\n\n',
        lambda i: b'data: {"id":"c","choices":[],"x_groq":{"error":"upstream hiccup"}}\n\n',
        lambda i: b"data: not json\n\n",
        lambda i: b'data: {"id":"c", "choices": [\n\n',
        lambda i: b'event: message\ndata: {"id":"c","choices":[]}\n\n',
        # Newlines the fast path's count must not be fooled by: blank events, two data lines, a field after data.
        lambda i: b"\n\n",
        lambda i: b'data: {"id":"c","choices":[]}\ndata: {"usage":null}\n\n',
        lambda i: b'data: {"id":"c","choices":[]}\nid: 5\n\n',
        lambda i: b'data: {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n',
        lambda i: b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"error"},"finish_reason":null}]}\n\n',
        lambda i: b"data: [DONE]\n\n",
    ]
    rng = random.Random(7)
    for _ in range(3000):
        events = [rng.choice(kinds[:4]) (i) if rng.random() < 0.8 else rng.choice(kinds)(i) for i in range(rng.randint(1, 14))]
        if rng.random() < 0.7:
            events.append(kinds[-1](0))
        cuts = sorted(rng.sample(range(1, len(events)), rng.randint(0, len(events) - 1))) if len(events) > 1 else []
        blocks, last = [], 0
        for cut in cuts + [len(events)]:
            blocks.append(b"".join(events[last:cut]))
            last = cut
        assert _state_of(scan, blocks) == _state_of(_scan_each, blocks), blocks
