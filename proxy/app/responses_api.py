"""The Responses API (`POST /v1/responses`, `client.responses.create`), which Groq serves beside chat.

The request is checked here (OpenAI-shaped 400s naming the field), then goes through the same pipeline as a
chat completion: virtual models and their chains, policies, cool-downs, key pools, deadlines, telemetry. What
differs is said by `RESPONSES`, the operation the pipeline is handed: the upstream path, what a 200 must be,
where the usage is (`response.usage.input_tokens` / `output_tokens`), and the stream's commit point and error
event (proxy/upstream/responses_sse.py).
"""

from __future__ import annotations

import orjson

from proxy.app import response_owners
from proxy.app.config import Config
from proxy.app.errors import ProxyError, bad_request
from proxy.app.validation import _kind, _model, read_json
from proxy.pipeline.operation import Operation
from proxy.upstream import responses_sse
from proxy.upstream.providers import AttemptFailed

_NUMBER_FIELDS = ("temperature", "top_p")
_STRING_FIELDS = ("instructions", "previous_response_id", "user", "service_tier")


def validate_responses(body: dict) -> str:
    """Returns the requested model name; raises a 400 naming the first wrong field."""
    model = _model(body)
    value = body.get("input")
    if value is None:
        raise bad_request("'input' is a required property.", param="input")
    if isinstance(value, str):
        if not value:
            raise bad_request("'input' must be a non-empty string or an array of input items.", param="input")
    elif isinstance(value, list):
        if not value:
            raise bad_request("'input' must contain at least one item.", param="input")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise bad_request(f"'input[{i}]' must be an object, not {_kind(item)}.", param=f"input[{i}]")
    else:
        raise bad_request(f"'input' must be a string or an array of input items, not {_kind(value)}.",
                          param="input")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"'stream' must be a boolean, not {_kind(stream)}.", param="stream")
    for name in _NUMBER_FIELDS:
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad_request(f"'{name}' must be a number, not {_kind(v)}.", param=name)
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise bad_request("'max_output_tokens' must be an integer of at least 1.", param="max_output_tokens")
    for name in _STRING_FIELDS:
        v = body.get(name)
        if v is not None and not isinstance(v, str):
            raise bad_request(f"'{name}' must be a string, not {_kind(v)}.", param=name)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request(f"'tools' must be an array, not {_kind(tools)}.", param="tools")
    return model


def _response(obj) -> dict:
    """A 200 that is a response object: a JSON object of `object: response` with an `output` list, not failed.
    Anything else is not an answer: AttemptFailed (the chain moves on)."""
    if not isinstance(obj, dict):
        raise AttemptFailed("malformed", "200 with a body that is not a JSON object")
    if obj.get("status") == "failed" or obj.get("error"):
        error = obj.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        raise AttemptFailed("upstream_error", f"200 with a failed response: {str(message)[:200]}")
    if obj.get("object") != "response" or not isinstance(obj.get("output"), list):
        raise AttemptFailed("malformed", "200 that is not a response object (no object: response with an output)")
    return obj


# A tier's params are written for chat (`params = { reasoning_effort = "low" }`); the Responses API names them
# otherwise. What the client sent in the Responses API's own names wins.
_CHAT_NAMES = ("reasoning_effort", "max_completion_tokens", "max_tokens")


def responses_shape(body: dict) -> dict:
    """The body with chat's names of a tier's params in the Responses API's: `reasoning_effort` as
    `reasoning.effort`, `max_completion_tokens` / `max_tokens` as `max_output_tokens`."""
    body = dict(body)
    effort = body.pop("reasoning_effort", None)
    if effort is not None:
        reasoning = body.get("reasoning")
        reasoning = dict(reasoning) if isinstance(reasoning, dict) else {}
        reasoning.setdefault("effort", effort)
        body["reasoning"] = reasoning
    completion, older = body.pop("max_completion_tokens", None), body.pop("max_tokens", None)
    limit = completion if completion is not None else older
    if limit is not None:
        body.setdefault("max_output_tokens", limit)
    return body


class ResponsesOperation(Operation):
    endpoint = "responses"
    sse = True
    owned = True  # stored responses are their proxy key's (proxy/app/response_owners.py)
    check = staticmethod(response_owners.check_previous)
    own = staticmethod(response_owners.record)

    def encode(self, body: dict) -> bytes:
        for name in _CHAT_NAMES:
            if name in body:
                return orjson.dumps(responses_shape(body))
        return orjson.dumps(body)

    def answer(self, attempt, body: bytes, content_type: str, record: bool = False) -> str:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise AttemptFailed("malformed", "200 with a body that is not JSON") from None
        obj = _response(obj)
        attempt.usage = responses_sse.usage_of(obj.get("usage"))
        attempt.response_id, attempt.response_model = obj.get("id"), obj.get("model")
        status = obj.get("status")
        attempt.finish_reasons = [status] if isinstance(status, str) else None
        if record:
            text = "".join(part.get("text", "") for item in obj["output"] if isinstance(item, dict)
                           and item.get("type") == "message" for part in item.get("content") or ()
                           if isinstance(part, dict) and part.get("type") == "output_text")
            attempt.content = _output(text, status)
        return "application/json"

    new_state = staticmethod(responses_sse.ResponsesState)
    commit_end = staticmethod(responses_sse.commit_end)
    scan = staticmethod(responses_sse.scan)
    well_formed_prefix = staticmethod(responses_sse.well_formed_prefix)

    def error_event(self, error: ProxyError, sequence: int) -> bytes:
        """The Responses API's own `error` event (openai-python yields it as a ResponseErrorEvent)."""
        data = {"type": "error", "code": error.code, "message": error.message, "param": error.param,
                "sequence_number": sequence}
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"

    def content(self, raw: bytes) -> str:
        return _output(responses_sse.output_text(raw), None)


def _output(text: str, status) -> str:
    """The output as the GenAI message format (gen_ai.output.messages)."""
    return orjson.dumps([{"role": "assistant", "parts": [{"type": "text", "content": text}],
                          "finish_reason": status}]).decode()


RESPONSES = ResponsesOperation()


async def read_responses(request, config: Config) -> tuple[dict, Operation]:
    return await read_json(request, config.server.max_body_bytes), RESPONSES
