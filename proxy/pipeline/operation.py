"""What the pipeline needs to know about an endpoint that is not chat completions or embeddings.

Chat and embeddings run with `ctx.op` None: their code paths are the pipeline's own and pay nothing for this
seam. Every other endpoint (the Responses API, audio) hands the pipeline an `Operation`: where the request goes
upstream, how its body is encoded for one model, how a 200 is checked and its usage read, and, for a stream,
where its commit point is and what its error event looks like. The chain, policies, cool-downs, key pools,
deadlines and telemetry stay the pipeline's, the same for every endpoint.

An operation is either a module singleton (the Responses API: nothing per request) or built per request
(audio: it holds the uploaded file, so that each attempt can send it again).
"""

from __future__ import annotations

import orjson

from proxy.app.errors import ProxyError


class Operation:
    """The defaults: a JSON body posted to `endpoint`, a JSON answer, no stream."""

    endpoint = ""  # the upstream path under the provider's base URL ("responses", "audio/speech")
    sse = False  # the body's `stream: true` asks for an SSE stream (commit point and error event below)
    content_type: str | None = None  # of the payload, when not the provider's application/json
    tokens = True  # token budgets and token limits apply (audio: no tokens, only requests and concurrency)
    audio = False  # spans and metrics carry `bytes_in` / `bytes_out` (audio) instead of tokens
    # The answer is an object the provider keeps for the caller (a stored response): with [auth], `check` runs
    # before the request goes upstream and `own` before the answer reaches the client.
    owned = False

    async def check(self, chain, identity, body: dict) -> None:
        """Raises a ProxyError when the request names a kept object that is not the caller's."""

    async def own(self, chain, identity, body: dict, object_id) -> None:
        """Records the caller as the owner of the object the answer made."""

    def encode(self, body: dict) -> bytes:
        """The payload of one attempt (`body["model"]` is already that attempt's model)."""
        return orjson.dumps(body)

    def answer(self, attempt, body: bytes, content_type: str, record: bool = False) -> str:
        """Checks a 200 answer (raises AttemptFailed when it is not one), records its usage, id and model on
        the attempt (and its output as `attempt.content` when `record`: telemetry.record_content), and returns
        the content type the client gets."""
        return "application/json"

    # --- SSE streams (sse = True) --------------------------------------------------------------------------

    def new_state(self):
        raise NotImplementedError

    def commit_end(self, complete: bytes) -> int:
        """Where the event that is the commit point ends in whole events; -1 when it has not come yet."""
        raise NotImplementedError

    def scan(self, complete: bytes, state) -> None:
        raise NotImplementedError

    def well_formed_prefix(self, complete: bytes) -> bytes:
        raise NotImplementedError

    def error_event(self, error: ProxyError, sequence: int) -> bytes:
        """How a failure after the commit point is told: the endpoint's own error event."""
        return error.sse_event()

    def content(self, raw: bytes) -> str:
        """The recorded output of a stream (only with telemetry.record_content)."""
        return "[]"

    # --- byte streams (audio/speech): `open` returns a response or an object with `forward` ----------------

    opens = False

    async def open(self, pipeline, ctx, attempt, provider, payload: bytes, headers: dict):
        raise NotImplementedError
