"""The Responses stream scanner: where the commit point is, what it records, what it calls malformed; and a
stream fed to the proxy a byte at a time reaching the client unchanged."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from proxy.sim import responses as rs
from proxy.sim.testing import Behaviour
from proxy.sim.testing_api import ApiUpstream
from proxy.upstream.responses_sse import ResponsesState, commit_end, scan, well_formed_prefix
from tests.conftest import config_for

EVENTS = rs.stream_events("m1")
PREAMBLE = EVENTS[0] + EVENTS[1]


def test_the_commit_point_is_the_first_event_past_the_preamble():
    assert commit_end(PREAMBLE) == -1
    assert commit_end(b": keep-alive\n\n" + PREAMBLE + b"data: [DONE]\n\n") == -1
    first = PREAMBLE + EVENTS[2]
    assert commit_end(first + EVENTS[3]) == len(first)
    assert commit_end(PREAMBLE + EVENTS[2][:-1]) == -1  # the event is not whole yet


def test_the_commit_point_without_event_lines_and_with_crlf():
    data_only = b"".join(e.split(b"\n", 1)[1] for e in EVENTS[:3])  # `data:` lines only: the type says it
    assert commit_end(data_only) == len(data_only)
    assert commit_end(b"".join(e.split(b"\n", 1)[1] for e in EVENTS[:2])) == -1
    crlf = b"".join(EVENTS[:3]).replace(b"\n", b"\r\n")
    assert commit_end(crlf) == len(crlf)


def test_scan_records_the_response_and_its_usage_once():
    state = ResponsesState()
    scan(b"".join(EVENTS), state)
    assert (state.response_id, state.response_model) == ("resp_test", "m1")
    assert state.done and state.finish_reasons == ["completed"] and state.error is None
    assert state.usage["prompt_tokens"] == 7 and state.usage["completion_tokens"] == 3
    assert state.usage["total_tokens"] == 10


def test_an_incomplete_response_ends_the_stream_and_done_is_accepted():
    incomplete = rs.event("response.incomplete", 9, response=rs.response_object("m1", "Hi", status="incomplete"))
    state = ResponsesState()
    scan(PREAMBLE + incomplete, state)
    assert state.done and state.finish_reasons == ["incomplete"]
    state = ResponsesState()
    scan(PREAMBLE + b"data: [DONE]\n\n", state)
    assert state.done and state.usage is None


@pytest.mark.parametrize("event, error", [
    (rs.event("error", 2, code="server_error", message="boom", param=None),
     {"message": "boom", "code": "server_error"}),
    (rs.event("response.failed", 2, response={**rs.response_object("m1", None, status="failed"),
                                               "error": {"code": "server_error", "message": "broke"}}),
     {"code": "server_error", "message": "broke"}),
])
def test_scan_records_errors(event, error):
    state = ResponsesState()
    scan(PREAMBLE + event, state)
    assert state.error == error and not state.done


@pytest.mark.parametrize("before, bad", [
    (PREAMBLE, b"data: not json\n\n"),  # any event whose data is not an object
    (b"", b'data: {"no": "type"}\n\n'),  # the first event is parsed whole: it must be a Responses event
    (b"", b"data: {bad json}\n\n"),
    (PREAMBLE, b'data: {"type":"response.completed", bad}\n\n'),  # an end event is parsed whole
])
def test_malformed_events_and_the_well_formed_prefix(before, bad):
    """Past the preamble only the events that may end the stream are parsed (the deltas go through unparsed,
    as a chat stream's chunks without usage do)."""
    state = ResponsesState()
    scan(before + bad, state)
    assert state.malformed
    assert well_formed_prefix(EVENTS[2] + b"data: not json\n\n" + EVENTS[3]) == EVENTS[2]


def test_a_delta_holding_the_words_of_an_end_event_is_not_one():
    sneaky = rs.event("response.output_text.delta", 5, item_id="x", output_index=0, content_index=0,
                      delta='"type":"response.completed" and "type":"error"')
    state = ResponsesState()
    scan(PREAMBLE + sneaky, state)
    assert not state.done and state.error is None and not state.malformed


async def test_a_stream_fed_a_byte_at_a_time_reaches_the_client_unchanged(aiohttp_server, start_proxy):
    scripted = ApiUpstream()
    whole = b"".join(rs.stream_events("m1", words=("Grüße", " 🎉", " done")))
    scripted.behaviours["m1"] = Behaviour("ok", events=[whole[i : i + 1] for i in range(len(whole))])
    server = await aiohttp_server(scripted.app())
    base = await start_proxy(config_for(f"http://127.0.0.1:{server.port}/openai/v1"))
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/responses", data=orjson.dumps(
                {"model": "tier-test", "input": "hi", "stream": True})) as resp:
            assert resp.status == 200
            assert await resp.read() == whole
    assert scripted.models_sent() == ["m1"]
