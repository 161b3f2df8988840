"""`/v1/batches`: create (from the caller's own input file only), retrieve, list and cancel, passed to the batch
provider and filtered to the caller's own batches (proxy/app/provider_objects.py says how and why). A batch's
output and error files become its owner's as soon as the batch is seen carrying them."""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.app.errors import bad_request
from proxy.app.object_call import Call, answer
from proxy.app.object_list import filtered_list
from proxy.app.provider_objects import parse
from proxy.app.validation import read_json


async def create(request: web.Request) -> web.StreamResponse:
    """POST /v1/batches {input_file_id, endpoint, completion_window, metadata?}."""
    return await answer(request, "batches", lambda call: _create(request, call))


async def retrieve(request: web.Request) -> web.StreamResponse:
    """GET /v1/batches/{batch_id}."""
    return await answer(request, "batches", lambda call: _one(request, call, "GET", ""))


async def cancel(request: web.Request) -> web.StreamResponse:
    """POST /v1/batches/{batch_id}/cancel."""
    return await answer(request, "batches", lambda call: _one(request, call, "POST", "/cancel"))


async def list_batches(request: web.Request) -> web.StreamResponse:
    """GET /v1/batches: the caller's batches only."""
    return await answer(request, "batches", lambda call: _list(request, call))


async def _create(request: web.Request, call: Call) -> web.StreamResponse:
    from proxy.app.server import STATE

    objects = call.objects
    body = await read_json(request, request.app[STATE].config.server.max_body_bytes)
    input_file = body.get("input_file_id")
    if not isinstance(input_file, str) or not input_file:
        raise bad_request("`input_file_id` is required: the id of a file uploaded with purpose `batch`.",
                          param="input_file_id", code="missing_required_parameter")
    await objects.check(call.chain, call.identity, "file", input_file, param="input_file_id", status=400)
    response = await objects.call("POST", "/batches", body=orjson.dumps(body), json=True)
    raw = await objects.read(response)
    if response.status == 200:
        await _owned(call, parse(raw))
    return call.passed(response, raw)


async def _one(request: web.Request, call: Call, method: str, tail: str) -> web.StreamResponse:
    batch_id = request.match_info["batch_id"]
    objects = call.objects
    await objects.check(call.chain, call.identity, "batch", batch_id)
    response = await objects.call(method, f"/batches/{batch_id}{tail}", json=method == "POST")
    raw = await objects.read(response)
    if response.status == 200:
        await _owned(call, parse(raw), files_only=True)
    return call.passed(response, raw)


async def _list(request: web.Request, call: Call) -> web.StreamResponse:
    return await filtered_list(request, call, "/batches", "batch",
                               lambda batch: _owned(call, batch, files_only=True))


async def _owned(call: Call, batch, files_only: bool = False) -> None:
    """Records the caller as the owner of a batch it made, and of the files the batch made."""
    if not isinstance(batch, dict) or call.identity is None or call.identity.key is None:
        return
    objects, chain, identity = call.objects, call.chain, call.identity
    if not files_only:
        await objects.record(chain, identity, "batch", batch.get("id"), batch.get("expires_at"))
    for field in ("output_file_id", "error_file_id"):
        if batch.get(field):
            await objects.record(chain, identity, "file", batch[field])
