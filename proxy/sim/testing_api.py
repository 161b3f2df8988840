"""The scripted test upstream, with the Responses API and audio beside chat: each model's `Behaviour` decides
its answer, as in proxy/sim/testing.py, and every request is recorded (audio: its form fields and file bytes).

Responses behaviours: ok (a response object, or `events` / the standard stream), status, hang, close, and for
streams `cut` (the first `cut_after` events, then the connection closes) and `error_event` (the first
`cut_after` events, then an `error` event). Speech: ok (the `audio` bytes in chunks of `speech_chunk`),
status, `cut` (`cut_after` chunks then a close); with `speech_hold` set, the first chunk goes out and the
rest waits for the event (a dripping upstream).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from proxy.sim import responses as rs
from proxy.sim.testing import Behaviour, ScriptedUpstream, ok

TRANSCRIPT = "Hello from the audio."
AUDIO = bytes(range(256)) * 64  # 16 KiB of "audio"


class ApiUpstream(ScriptedUpstream):
    def __init__(self, behaviours: dict[str, Behaviour] | None = None) -> None:
        super().__init__(behaviours)
        self.audio = AUDIO
        self.speech_chunk = 4096
        self.speech_hold: asyncio.Event | None = None
        self.speech_sent = asyncio.Event()  # set once the first chunk of speech has been written
        self.stream_hold: asyncio.Event | None = None  # a Responses cut, error event or failed status waits for it

    def app(self) -> web.Application:
        app = super().app()
        for prefix in ("/openai/v1", "/v1"):
            app.router.add_post(prefix + "/responses", self._responses)
            app.router.add_post(prefix + "/audio/transcriptions", self._transcription)
            app.router.add_post(prefix + "/audio/translations", self._transcription)
            app.router.add_post(prefix + "/audio/speech", self._speech)
        return app

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body,
                              "request": request})
        model = body.get("model")
        b = self._behaviour(request, model)
        if b.kind in ("status", "hang", "close"):
            if self.stream_hold is not None:
                await self.stream_hold.wait()
            return await self._misbehave(request, b, body)
        if not body.get("stream"):
            payload = b.body if b.body is not None else rs.response_object(model, "Hello there!")
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            return web.Response(body=data, content_type="application/json", headers={"x-request-id": "req_up"})
        events = b.events or rs.stream_events(model)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **b.headers})
        await resp.prepare(request)
        if b.kind == "ok":
            for event in events:
                await resp.write(event)
            await resp.write_eof()
            return resp
        for event in events[: b.cut_after]:
            await resp.write(event)
        if self.stream_hold is not None:
            await self.stream_hold.wait()
        if b.kind == "error_event":
            await resp.write(rs.event("error", b.cut_after, code="server_error", message="overloaded mid-stream",
                                      param=None))
            await resp.write_eof()
        elif b.kind == "cut":
            await asyncio.sleep(0.01)
            request.transport.close()
        return resp

    async def _transcription(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = {k: v for k, v in form.items() if not isinstance(v, web.FileField)}
        upload = form.get("file")
        record = {"path": request.path, "headers": dict(request.headers), "body": fields, "request": request,
                  "file": upload.file.read() if isinstance(upload, web.FileField) else None,
                  "filename": upload.filename if isinstance(upload, web.FileField) else None,
                  "all": list(form.items())}
        self.requests.append(record)
        b = self._behaviour(request, fields.get("model"))
        if b.kind != "ok":
            return await self._misbehave(request, b, fields)
        fmt = fields.get("response_format") or "json"
        if fmt in ("text", "srt", "vtt"):
            return web.Response(text=TRANSCRIPT + "\n", content_type="text/plain")
        return web.Response(body=orjson.dumps({"text": TRANSCRIPT, "x_groq": {"id": "req_audio"}}),
                            content_type="application/json")

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body,
                              "request": request})
        b = self._behaviour(request, body.get("model"))
        if b.kind in ("status", "hang", "close"):
            return await self._misbehave(request, b, body)
        resp = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunks = [self.audio[at : at + self.speech_chunk] for at in range(0, len(self.audio), self.speech_chunk)]
        for n, chunk in enumerate(chunks):
            if b.kind == "cut" and n == b.cut_after:
                await asyncio.sleep(0.01)
                request.transport.close()
                return resp
            await resp.write(chunk)
            if n == 0:
                self.speech_sent.set()
                if self.speech_hold is not None:
                    await self.speech_hold.wait()
        await resp.write_eof()
        return resp


__all__ = ["ApiUpstream", "AUDIO", "TRANSCRIPT", "Behaviour", "ok"]
