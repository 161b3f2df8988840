"""A cache entry's shapes, unit by unit: a stream's chunks assembled into a plain answer (tool calls
included), a plain answer made into a stream, the usage chunk kept apart, and the wire form Redis holds."""

from __future__ import annotations

import orjson

from policies.cache.entry import DONE, Entry, from_plain, from_stream, split_events
from policies.cache.key import cache_key, control
from proxy.sim.testing import USAGE, chat_chunk, completion, sse, stream_events


def tool_stream() -> list[bytes]:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    return [
        sse(chat_chunk("m1", None) | {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]},
                                                   "finish_reason": None}]}),
        sse(chat_chunk("m1", None) | {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city":'}}]}, "finish_reason": None}]}),
        sse(chat_chunk("m1", None) | {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '"Paris"}'}}]}, "finish_reason": None}]}),
        sse(chat_chunk("m1", None, "tool_calls")),
        sse({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "m1", "choices": [],
             "usage": USAGE}),
        b"data: [DONE]\n\n",
    ]


def test_a_streamed_tool_call_is_assembled_into_a_plain_answer_and_its_usage_chunk_kept_apart():
    events = split_events(b"".join(tool_stream()))
    entry = from_stream("k", "tier", "all", "m1", events)
    plain = orjson.loads(entry.plain)
    message = plain["choices"][0]["message"]
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert message["content"] is None and plain["choices"][0]["finish_reason"] == "tool_calls"
    assert plain["usage"] == USAGE and entry.tokens == 10
    assert entry.stream == b"".join(tool_stream()[:4]) + DONE  # without the usage chunk
    assert entry.stream_usage == b"".join(tool_stream())


def test_a_plain_answer_becomes_a_stream_that_assembles_back_to_it():
    body = orjson.dumps(completion("m1", "Hi there"))
    entry = from_plain("k", "tier", "all", "m1", body)
    assert entry.plain == body
    chunks = [orjson.loads(e[6:]) for e in entry.stream.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hi there"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["x_groq"]["usage"] == USAGE
    again = from_stream("k", "tier", "all", "m1", split_events(entry.stream_usage))
    assert orjson.loads(again.plain)["choices"][0]["message"]["content"] == "Hi there"


def test_several_choices_and_unfinished_streams_make_no_entry():
    two = sse(chat_chunk("m1", "a") | {"choices": [{"index": 1, "delta": {"content": "b"}, "finish_reason": None}]})
    assert from_stream("k", "t", "all", "m1", split_events(two + sse(chat_chunk("m1", None, "stop")))) is None
    unfinished = b"".join(stream_events("m1")[:-2])
    assert from_stream("k", "t", "all", "m1", split_events(unfinished)) is None


def test_the_wire_form_round_trips():
    entry = from_stream("k", "tier", "u:ann", "m1", split_events(b"".join(stream_events("m1"))))
    back = Entry.loads(entry.dumps())
    assert (back.plain, back.stream, back.stream_usage, back.tokens, back.who, back.model) == (
        entry.plain, entry.stream, entry.stream_usage, entry.tokens, entry.who, entry.model)


def test_the_key_is_canonical():
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0.2, "model": "a"}
    same = {"temperature": 0.2, "stream": True, "stream_options": {"include_usage": True}, "user": "u",
            "messages": [{"content": "x", "role": "user"}], "model": "b"}
    assert cache_key("tier", body, "all") == cache_key("tier", same, "all")
    assert cache_key("tier", body, "all") != cache_key("tier", body, "k:one")
    assert cache_key("tier", body, "all") != cache_key("other", body, "all")
    assert cache_key("tier", body, "all") != cache_key("tier", {**body, "top_p": 0.5}, "all")


def test_cache_control():
    assert (control("no-store").lookup, control("no-store").store) == (False, False)
    assert (control("no-cache").lookup, control("no-cache").store) == (False, True)
    assert control("max-age=30").max_age == 30 and control("public").max_age is None


def test_the_key_is_the_sha256_of_the_documented_canonical_request():
    """Keys stay what they were (entries kept in Redis outlive a restart on a newer proxy): SHA-256 of
    [model, who, the body without stream, stream_options, user and model], keys sorted."""
    import hashlib

    import orjson

    body = {"model": "tier-fast", "messages": [{"role": "user", "content": "hi", "name": "a"}], "stream": True,
            "stream_options": {"include_usage": True}, "user": "bob", "temperature": 0, "seed": 7}
    canonical = {"messages": [{"content": "hi", "name": "a", "role": "user"}], "seed": 7, "temperature": 0}
    expected = hashlib.sha256(orjson.dumps(["tier", "k:one", canonical], option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert cache_key("tier", body, "k:one") == expected
    assert body["stream"] is True and body["user"] == "bob" and body["model"] == "tier-fast"  # left as it was
    plain = {"model": "tier-fast", "messages": body["messages"], "temperature": 0, "seed": 7}
    assert cache_key("tier", plain, "k:one") == expected
