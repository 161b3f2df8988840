"""A policy's answer in place of the upstream's: an OpenAI-shaped error (`Reject`) or an answer (`Respond`),
plain or streamed. Only the pipeline writes to the client; this is the part that writes these."""

from __future__ import annotations

import orjson
from aiohttp import web

from policies.base import Decision, Reject, Respond
from proxy.pipeline.client_stream import SSE_HEADERS
from proxy.pipeline.whole_answer import whole_answer


async def respond(request: web.Request, decision: Decision, base_headers: dict[str, str]) -> web.StreamResponse:
    if isinstance(decision, Reject):
        return decision.error().to_answer(base_headers)
    if not isinstance(decision, Respond):
        raise TypeError(f"on_request returned {decision!r}: not a Decision the pipeline acts on")
    headers = {**base_headers, **decision.headers}
    if decision.events is None:
        body = decision.body
        if not isinstance(body, (bytes, bytearray)):
            body = orjson.dumps(body)
        headers.setdefault("Content-Type", "application/json")
        return whole_answer(decision.status, headers, body) or web.Response(status=decision.status, body=body,
                                                                            headers=headers)
    events = decision.events
    if isinstance(events, (list, tuple)):  # all of it known (a cache hit): one response, one write
        body, headers = b"".join(events), {**SSE_HEADERS, **headers}
        return whole_answer(decision.status, headers, body) or web.Response(status=decision.status, body=body,
                                                                            headers=headers)
    response = web.StreamResponse(status=decision.status, headers={**SSE_HEADERS, **headers})
    try:
        await response.prepare(request)
        if hasattr(events, "__aiter__"):
            async for event in events:
                await response.write(event)
        else:
            for event in events:
                await response.write(event)
        await response.write_eof()
    except ConnectionResetError:  # the client went away: nothing more to say to it
        pass
    return response
