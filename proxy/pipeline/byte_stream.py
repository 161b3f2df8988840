"""Text to speech (`/v1/audio/speech`): audio bytes passed to the client as the upstream sends them.

The commit point is the first byte of the upstream's 200 body. Until it arrives (within the provider's
first_byte_timeout_s) a failure falls over to the next model, as for chat: a refusal, a 5xx, a connection
that breaks, a 200 with no body. From it on, the response's head has gone out with a chunked body: a failure
then cannot become an error object, so the connection is closed without the body's last chunk, and the client
sees a cut transfer (httpx raises RemoteProtocolError) instead of a short file it would take for whole.

Like the SSE path, only the pipeline's code writes to the client: this is the byte-stream part of it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from proxy.app.audio_api import AudioOperation
from proxy.upstream.http1 import UpstreamError
from proxy.upstream.providers import AttemptFailed

INFO, WARNING = logging.INFO, logging.WARNING


class SpeechOperation(AudioOperation):
    endpoint = "audio/speech"
    opens = True

    def __init__(self, request: web.Request) -> None:
        super().__init__()
        self.request = request

    async def open(self, pipeline, ctx, attempt, provider, payload: bytes, headers: dict):
        """Sends the request and reads until the first byte of audio; any failure until then falls over. The
        opening is the pipeline's, the same as an SSE stream's (`Pipeline._open`); only its end is audio's own."""
        self.bytes_in = len(ctx.body["input"].encode())  # validated: a non-empty string

        async def first_audio(ctx, attempt, provider, resp, start: float) -> _Opened:
            first = await resp.readany()
            if not first:
                raise AttemptFailed("malformed", "200 without any audio")
            attempt.first_byte = time.perf_counter()
            return _Opened(pipeline, ctx, attempt, provider, resp, first, start, self)

        return await pipeline._open(ctx, attempt, provider, payload, headers, first_audio, "audio")


class _Opened:
    """An audio answer at its commit point: the response, its first bytes, when its attempt started."""

    __slots__ = ("pipeline", "ctx", "attempt", "provider", "resp", "first", "start", "op")

    def __init__(self, pipeline, ctx, attempt, provider, resp, first: bytes, start: float, op: SpeechOperation):
        self.pipeline, self.ctx, self.attempt, self.provider = pipeline, ctx, attempt, provider
        self.resp, self.first, self.start, self.op = resp, first, start, op

    async def forward(self) -> web.StreamResponse:
        """The commit point, then every chunk as it comes, until timeout_s from the attempt's start."""
        from proxy.pipeline.pipeline import _passed_on, _upstream_failure

        pipeline, ctx, attempt, resp, op = self.pipeline, self.ctx, self.attempt, self.resp, self.op
        headers = {**ctx.base_headers, **pipeline._answer_headers(ctx, attempt), **_passed_on(resp.headers)}
        if ctx.policy is not None and ctx.policy.headers:
            headers.update(ctx.policy.headers)
        headers["Content-Type"] = resp.headers.get("content-type") or "application/octet-stream"
        response = web.StreamResponse(status=200, headers=headers)
        response.enable_chunked_encoding()
        ended = False
        try:
            async with asyncio.timeout_at(self.start + self.provider.total_s):
                await response.prepare(op.request)
                chunk = self.first
                while chunk:
                    await response.write(chunk)
                    op.bytes_out += len(chunk)
                    chunk = await resp.readany()
                ended = True
                await response.write_eof()
        except ConnectionError:
            if ended:  # all of it went out; the client left before the last empty chunk
                pipeline._answered(ctx, attempt)
                return response
            attempt.outcome, attempt.reason = "cancelled", "client_disconnected"
            pipeline._end(ctx, attempt, INFO)
            return response
        except asyncio.CancelledError:  # the client left, or the request's latency target passed
            if attempt.ended is None:
                pipeline._cancelled(ctx, attempt)
            if response.prepared:  # the head went out: only a cut transfer can still say "not complete"
                self._close()
            raise
        except TimeoutError:
            return self._broken(response, "timeout", f"not complete in {self.provider.total_s:g}s")
        except UpstreamError as exc:
            failure = _upstream_failure(exc)
            return self._broken(response, failure.reason, failure.detail)
        finally:
            resp.release(drain=ended)
        pipeline._answered(ctx, attempt)
        return response

    def _broken(self, response: web.StreamResponse, reason: str, detail: str) -> web.StreamResponse:
        """A failure after the commit point: the connection closes with the chunked body unfinished."""
        attempt = self.attempt
        attempt.outcome, attempt.reason, attempt.detail = "failed_after_commit", reason, detail
        self.pipeline.cooldowns.failed(attempt.target.key)
        self.pipeline._end(self.ctx, attempt, WARNING)
        self._close()
        return response

    def _close(self) -> None:
        transport = self.op.request.transport
        if transport is not None:
            transport.close()
