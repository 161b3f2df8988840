"""The Responses API of the simulator and of the scripted test upstream: response objects and the named-event
stream, shaped as OpenAI and Groq send them (`event: response.output_text.delta` + `data: {"type": ...}`)."""

from __future__ import annotations

import asyncio
import time
import zlib

import orjson

USAGE = {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 10}


def event(kind: str, sequence: int, **fields) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(
        {"type": kind, "sequence_number": sequence, **fields}) + b"\n\n"


def response_object(model: str, text: str, usage: dict | None = USAGE, *, status: str = "completed",
                    response_id: str = "resp_test", item_id: str = "msg_test") -> dict:
    output = []
    if text is not None and status != "in_progress":
        output.append({"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
        "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "truncation": "disabled", "usage": usage if status != "in_progress" else None, "metadata": {},
    }


def stream_events(model: str, words=("Hello", " there", "!"), usage: dict = USAGE, *,
                  response_id: str = "resp_test") -> list[bytes]:
    """A whole stream, one element per event: created, in_progress, the message item and its text part,
    one delta per word, the closing events, completed."""
    item_id = "msg_test"
    text = "".join(words)
    pending = response_object(model, None, None, status="in_progress", response_id=response_id)
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    events = [event("response.created", 0, response=pending), event("response.in_progress", 1, response=pending),
              event("response.output_item.added", 2, output_index=0, item=item),
              event("response.content_part.added", 3, item_id=item_id, output_index=0, content_index=0, part=part)]
    n = 4
    for word in words:
        events.append(event("response.output_text.delta", n, item_id=item_id, output_index=0, content_index=0,
                            delta=word, logprobs=[]))
        n += 1
    done_part = {**part, "text": text}
    done_item = {**item, "status": "completed", "content": [done_part]}
    events += [
        event("response.output_text.done", n, item_id=item_id, output_index=0, content_index=0, text=text,
              logprobs=[]),
        event("response.content_part.done", n + 1, item_id=item_id, output_index=0, content_index=0, part=done_part),
        event("response.output_item.done", n + 2, output_index=0, item=done_item),
        event("response.completed", n + 3,
              response=response_object(model, text, usage, response_id=response_id, item_id=item_id)),
    ]
    return events


def prompt_words(value) -> int:
    """The simulator's count of prompt tokens: words of the input, text parts included."""
    if isinstance(value, str):
        return len(value.split())
    count = 0
    for item in value if isinstance(value, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            count += len(content.split())
        elif isinstance(content, list):
            count += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    return count


def seed_of(value) -> int:
    return zlib.crc32(orjson.dumps(value))


# --- the simulator's route -------------------------------------------------------------------------------------


def add_routes(app, prefix: str, simulator) -> None:
    from aiohttp import web

    from proxy.sim import simulator as sim

    async def responses(request: web.Request) -> web.StreamResponse:
        request_id = simulator._next_request_id()
        try:
            body = await sim._read_object(request)
            model = simulator._check_model(body)
            value = body.get("input")
            if not isinstance(value, (str, list)) or not value:
                raise sim._ApiError(400, "'input' : value must be a string or an array of items", param="input")
            stream = sim._bool(body, "stream")
            limit = sim._optional_int(body, "max_output_tokens", 1, sim.MAX_COMPLETION_TOKENS)
            prompt_tokens = 4 + prompt_words(value)
            simulator._draw_fault(model, prompt_tokens)
        except sim._ApiError as exc:
            return sim._error_response(exc, simulator._headers(request_id, 0))
        count = limit or simulator.config.completion_tokens
        words = sim._window(sim._RING_WORDS, seed_of(value) % sim._RING_SIZE, count)
        words = [w if i == 0 else " " + w for i, w in enumerate(words)]
        usage = {**USAGE, "input_tokens": prompt_tokens, "output_tokens": count, "total_tokens": prompt_tokens + count}
        headers = simulator._headers(request_id, usage["total_tokens"])
        response_id = "resp_" + sim._hex(12)
        if simulator.config.ttft_s:
            await asyncio.sleep(simulator.config.ttft_s)
        if not stream:
            if simulator.config.tokens_per_s and count > 1:
                await asyncio.sleep((count - 1) / simulator.config.tokens_per_s)
            obj = response_object(model, "".join(words), usage, response_id=response_id,
                                  status="incomplete" if limit is not None else "completed")
            return web.Response(body=orjson.dumps(obj), content_type="application/json", headers=headers)
        response = web.StreamResponse(headers={**headers, "cache-control": "no-cache"})
        response.content_type = "text/event-stream"
        try:
            await response.prepare(request)
            await sim._write_paced(response, stream_events(model, words, usage, response_id=response_id),
                                   simulator.config.tokens_per_s)
        except ConnectionError:
            pass
        return response

    app.router.add_post(f"{prefix}/responses", responses)
