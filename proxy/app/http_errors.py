"""aiohttp's own error answers, in OpenAI's shape: a request it could not parse, or a handler that raised.

aiohttp answers a garbage request line, a bad header (NUL, a `Content-Length` that is not a number or comes
with chunked) or a head over its limits itself, before any route or middleware runs
(`RequestHandler.handle_error`): a text/plain 400 for all of them, and a multi-line traceback through its
`aiohttp.server` logger for each, which any client could use to flood the log. aiohttp gives no hook for it
(`web.Application` may not be subclassed and the server's handler class is fixed), so `handle_error` is
wrapped once. For a server whose logger is `HTTP_LOGGER` (the proxy's app sets it in its handler args) the
answer is `{"error": {...}}` with an `x-request-id`, 431 for a head over `server.max_header_bytes` or
`server.max_headers`, 414 for a URL over `server.max_url_bytes`, and one JSON log line. Any other aiohttp
server in the process (the embedded simulator, test upstreams) keeps aiohttp's behaviour.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.app.errors import ProxyError, new_request_id
from proxy.telemetry.logs import emit

HTTP_LOGGER = logging.getLogger("groq_proxy.http")  # a child of the JSON logger: anything aiohttp logs is a line

_aiohttp_handle_error = RequestHandler.handle_error


def install() -> None:
    """Idempotent; called when the proxy's app is built."""
    RequestHandler.handle_error = _handle_error


def _handle_error(self: RequestHandler, request, status: int = 500, exc: BaseException | None = None,
                  message: str | None = None):
    if self.logger is not HTTP_LOGGER:
        return _aiohttp_handle_error(self, request, status, exc, message)
    rid = new_request_id()
    if isinstance(exc, HttpProcessingError):
        error = _parse_error(self, exc)
        emit(logging.INFO, "bad_http_request", request_id=rid, status=error.status, reason=error.code,
             detail=error.message, remote=request.remote)
    elif status == 504:
        error = ProxyError(504, f"The proxy timed out answering (request {rid}).", type="server_error",
                           code="timeout")
        emit(logging.WARNING, "handler_timeout", request_id=rid, path=request.path)
    else:
        error = ProxyError(500, f"Internal error in the proxy (request {rid}).", type="server_error")
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        emit(logging.ERROR, "internal_error", request_id=rid, path=request.path, exc_info=exc_info)
    if request.writer.output_size > 0:  # as aiohttp: a response is under way, the connection is all we can end
        raise ConnectionError("Response is sent already, cannot send another response with the error message")
    response = error.to_response({"x-request-id": rid})
    response.force_close()
    return response


def _parse_error(handler: RequestHandler, exc: HttpProcessingError) -> ProxyError:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        # The parser tells a long URL from a long header line only by the limit it broke; with
        # server.max_url_bytes equal to server.max_header_bytes a long URL is answered 431 too.
        if limit == handler.max_line_size and limit != handler.max_field_size:
            return ProxyError(414, f"The request URL is longer than {limit} bytes.", code="url_too_long")
        return ProxyError(431, f"A request header is longer than {handler.max_field_size} bytes (name and value).",
                          code="headers_too_large")
    if exc.message == "Too many headers received":
        return ProxyError(431, f"The request has more than {handler.max_headers} headers.",
                          code="headers_too_large")
    status = exc.code if 400 <= exc.code < 500 else 400
    return ProxyError(status, f"The request is not valid HTTP/1.1: {_first_line(exc.message)}.",
                      code="bad_http_request")


def _first_line(text: str) -> str:
    """The parser's reason without the client's bytes it quotes on the lines after it, bounded."""
    return text.strip().split("\n", 1)[0].rstrip(":")[:200]
