"""`/v1/files`: upload (streamed, never held whole), list, retrieve, content (streamed) and delete, passed to the
batch provider and filtered to the caller's own files (proxy/app/provider_objects.py says how and why)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.app.errors import ProxyError
from proxy.app.multipart_upload import Upload
from proxy.app.object_call import Call, answer
from proxy.app.object_list import filtered_list
from proxy.app.provider_objects import parse, upstream_failed, upstream_timeout
from proxy.telemetry.logs import emit
from proxy.upstream.http1 import UpstreamError


async def upload(request: web.Request) -> web.StreamResponse:
    """POST /v1/files (multipart: `file`, `purpose=batch`)."""
    return await answer(request, "files", lambda call: _upload(request, call))


async def list_files(request: web.Request) -> web.StreamResponse:
    """GET /v1/files: the caller's files only."""
    return await answer(request, "files", lambda call: _list(request, call))


async def retrieve(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{file_id}."""
    return await answer(request, "files", lambda call: _retrieve(request, call))


async def content(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{file_id}/content: the bytes, streamed as they arrive."""
    return await answer(request, "files", lambda call: _content(request, call))


async def delete(request: web.Request) -> web.StreamResponse:
    """DELETE /v1/files/{file_id}."""
    return await answer(request, "files", lambda call: _delete(request, call))


async def _upload(request: web.Request, call: Call) -> web.StreamResponse:
    objects = call.objects
    provider = objects.provider
    body = Upload(request, objects.max_file_bytes)
    await objects.reachable(call.chain, call.identity)
    try:
        await body.start()
        loop = asyncio.get_running_loop()
        headers = {**objects.headers, "Content-Type": body.content_type}
        async with asyncio.timeout(None) as deadline:

            async def pieces():
                async for piece in body:
                    yield piece
                # Sent whole: from here the provider has its timeout_s to answer, as any request does.
                deadline.reschedule(loop.time() + provider.total_s)

            response = await objects.upstreams.client.request_stream(
                provider.origin, "POST", objects.path("/files"), headers, pieces(), provider.connect_s)
    except ProxyError as error:
        if error.status in (408, 499):  # a stalled or broken upload: nothing more of it is read
            _stop_reading(request)
        raise  # else aiohttp reads the rest (for a while) and drops it, so the client sees this answer
    except TimeoutError:
        raise upstream_timeout(provider.total_s) from None
    except UpstreamError as exc:
        _stop_reading(request)
        raise upstream_failed(exc) from None
    raw = await objects.read(response)
    if response.status == 200:
        made = parse(raw)
        if isinstance(made, dict):
            await objects.record(call.chain, call.identity, "file", made.get("id"), made.get("expires_at"))
    return call.passed(response, raw)


async def _list(request: web.Request, call: Call) -> web.StreamResponse:
    return await filtered_list(request, call, "/files", "file")


async def _retrieve(request: web.Request, call: Call) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    objects = call.objects
    await objects.check(call.chain, call.identity, "file", file_id)
    response = await objects.call("GET", f"/files/{file_id}")
    return call.passed(response, await objects.read(response))


async def _delete(request: web.Request, call: Call) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    objects = call.objects
    await objects.check(call.chain, call.identity, "file", file_id)
    response = await objects.call("DELETE", f"/files/{file_id}")
    raw = await objects.read(response)
    if response.status == 200:
        await objects.forget(call.chain, call.identity, "file", file_id)
    return call.passed(response, raw)


async def _content(request: web.Request, call: Call) -> web.StreamResponse:
    file_id = request.match_info["file_id"]
    objects = call.objects
    await objects.check(call.chain, call.identity, "file", file_id)
    deadline = asyncio.get_running_loop().time() + objects.body_s
    total_s = objects.provider.total_s
    response = await objects.call("GET", f"/files/{file_id}/content")
    if response.status != 200:
        return call.passed(response, await objects.read(response))
    out = web.StreamResponse(headers={"Content-Type": response.headers.get("content-type", "application/octet-stream"),
                                      **call.headers()})
    length = response.headers.get("content-length")
    if length is not None and length.isdigit():
        out.content_length = int(length)
    try:
        # The head came within timeout_s; the body has until body_timeout_s from the request, whatever pace the
        # provider keeps (a byte now and then must not hold the request and the connection for ever), and no
        # silence longer than timeout_s.
        async with asyncio.timeout_at(deadline):
            await out.prepare(request)  # the commit point: from here a failure can only cut the download short
            while request.method != "HEAD":  # a HEAD answer is its head alone (aiohttp would send what is written)
                async with asyncio.timeout(total_s):
                    chunk = await response.readany()
                if not chunk:
                    break
                await out.write(chunk)
        response.release()
    except TimeoutError:
        response.close()
        if not out.prepared:
            raise upstream_timeout(objects.body_s) from None
        emit(logging.WARNING, "download_cut", file_id=file_id, reason="timeout",
             detail=f"no byte for {total_s:g} s (timeout_s), or not whole in {objects.body_s:g} s (body_timeout_s)")
        if request.transport is not None:  # a short body, never one that looks whole
            request.transport.abort()
        return out
    except UpstreamError:
        response.close()
        if request.transport is not None:  # a short body, never one that looks whole
            request.transport.abort()
        return out
    finally:
        response.close()
    await out.write_eof()
    return out


def _stop_reading(request: web.Request) -> None:
    """The rest of an upload the proxy refused is not read: the answer closes the connection."""
    request.protocol.close()
    request.content.feed_eof()
