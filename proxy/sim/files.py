"""Groq's files and batches API, simulated: uploads kept in memory, batches answered at once with simulated
completions, so `make serve` shows the whole flow (upload, batch, poll, download the output) without a key.

A batch is run when it is created; the create answer says `validating` (as Groq's does) and every later look
says `completed`, with an output file of one simulated answer per valid line and an error file for the lines
that are not valid requests. A batch cancelled before anyone looked at it is `cancelled` instead.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import orjson
from aiohttp import web

MAX_FILE_BYTES = 200 * 1024 * 1024  # Groq's limit on a batch input file
ENDPOINTS = ("/v1/chat/completions",)
_WORDS = ("batch", "answer", "simulated", "groq", "proxy", "file", "line", "model", "token", "result", "done", "ok")


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": param}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _page(request: web.Request, items: list[dict]) -> web.Response:
    """OpenAI's cursor page: `after` an id, at most `limit` (all when unset), `has_more`."""
    after = request.query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    limit = request.query.get("limit")
    more = False
    if limit is not None:
        if not limit.isdigit() or not 1 <= int(limit) <= 10000:
            return _error(400, "limit must be between 1 and 10000", param="limit")
        more = len(items) > int(limit)
        items = items[: int(limit)]
    return _json({"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                  "last_id": items[-1]["id"] if items else None, "has_more": more})


def _id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _answer_text(body: Any) -> str:
    """A few words chosen by a hash of the request: the same line gets the same answer."""
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()
    return " ".join(_WORDS[b % len(_WORDS)] for b in digest[:8]).capitalize() + "."


class SimFiles:
    """The files and batches of one simulator app, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[dict, bytes]] = {}
        self.batches: dict[str, dict] = {}
        self._looked: set[str] = set()  # batches someone has seen since their creation

    def register(self, app: web.Application, prefixes: tuple[str, ...]) -> None:
        for prefix in prefixes:
            app.router.add_post(f"{prefix}/files", self.upload)
            app.router.add_get(f"{prefix}/files", self.list_files)
            app.router.add_get(f"{prefix}/files/{{file_id}}", self.retrieve)
            app.router.add_delete(f"{prefix}/files/{{file_id}}", self.delete)
            app.router.add_get(f"{prefix}/files/{{file_id}}/content", self.content)
            app.router.add_post(f"{prefix}/batches", self.create_batch)
            app.router.add_get(f"{prefix}/batches", self.list_batches)
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self.retrieve_batch)
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self.cancel_batch)

    # --- files ------------------------------------------------------------------------------------------

    def _store(self, data: bytes, filename: str, purpose: str) -> dict:
        meta = {"id": _id("file_"), "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose}
        self.files[meta["id"]] = (meta, data)
        return meta

    async def upload(self, request: web.Request) -> web.Response:
        if request.content_type != "multipart/form-data":
            return _error(400, "request Content-Type must be multipart/form-data", param="file")
        purpose, data, filename = None, None, "file"
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "file"
                chunks, size = [], 0
                while chunk := await part.read_chunk(64 * 1024):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        return _error(413, f"file is larger than {MAX_FILE_BYTES} bytes", param="file")
                    chunks.append(chunk)
                data = b"".join(chunks)
        if data is None:
            return _error(400, "'file' is a required property", param="file")
        if purpose != "batch":
            return _error(400, f"purpose must be 'batch', got {purpose!r}"[:200], param="purpose")
        return _json(self._store(data, filename, purpose))

    async def list_files(self, request: web.Request) -> web.Response:
        return _page(request, [meta for meta, _ in reversed(self.files.values())])  # newest first

    def _file(self, request: web.Request) -> tuple[dict, bytes] | None:
        return self.files.get(request.match_info["file_id"])

    async def retrieve(self, request: web.Request) -> web.Response:
        found = self._file(request)
        if found is None:
            return _error(404, "file not found", code="not_found")
        return _json(found[0])

    async def content(self, request: web.Request) -> web.Response:
        found = self._file(request)
        if found is None:
            return _error(404, "file not found", code="not_found")
        return web.Response(body=found[1], content_type="application/octet-stream")

    async def delete(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if self.files.pop(file_id, None) is None:
            return _error(404, "file not found", code="not_found")
        return _json({"id": file_id, "object": "file", "deleted": True})

    # --- batches ----------------------------------------------------------------------------------------

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        input_id = body.get("input_file_id")
        if not isinstance(input_id, str) or input_id not in self.files:
            return _error(400, f"No such File object: {str(input_id)[:128]}", code="file_not_found",
                          param="input_file_id")
        if body.get("endpoint") not in ENDPOINTS:
            return _error(400, f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        window = body.get("completion_window")
        if not isinstance(window, str) or not window.endswith(("h", "d")):
            return _error(400, "completion_window must be like '24h' or '7d'", param="completion_window")
        now = int(time.time())
        batch = {"id": _id("batch_"), "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": input_id, "completion_window": window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None}
        self.batches[batch["id"]] = batch
        return _json(batch)

    def _run(self, batch: dict) -> None:
        """Answers every line of the input file: the output and error files, the counts, `completed`."""
        _, data = self.files.get(batch["input_file_id"], ({}, b""))
        answers, errors = [], []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                request = orjson.loads(line)
            except orjson.JSONDecodeError:
                request = None
            custom_id = request.get("custom_id") if isinstance(request, dict) else None
            body = request.get("body") if isinstance(request, dict) else None
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                errors.append({"id": _id("batch_req_"), "custom_id": custom_id, "response": None,
                               "error": {"code": "invalid_request", "message": f"line {number}: not a request"}})
                continue
            text = _answer_text(body)
            completion = {"id": _id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                          "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 8, "completion_tokens": len(text.split()),
                                    "total_tokens": 8 + len(text.split())}}
            answers.append({"id": _id("batch_req_"), "custom_id": custom_id, "error": None,
                            "response": {"status_code": 200, "request_id": _id("req_"), "body": completion}})
        now = int(time.time())
        if answers:
            out = b"".join(orjson.dumps(a) + b"\n" for a in answers)
            batch["output_file_id"] = self._store(out, "batch_output.jsonl", "batch_output")["id"]
        if errors:
            out = b"".join(orjson.dumps(e) + b"\n" for e in errors)
            batch["error_file_id"] = self._store(out, "batch_errors.jsonl", "batch_output")["id"]
        batch.update(status="completed", in_progress_at=now, finalizing_at=now, completed_at=now,
                     request_counts={"total": len(answers) + len(errors), "completed": len(answers),
                                     "failed": len(errors)})

    def _look(self, batch: dict) -> dict:
        if batch["id"] not in self._looked:
            self._looked.add(batch["id"])
            if batch["status"] == "validating":
                self._run(batch)
            elif batch["status"] == "cancelling":
                batch.update(status="cancelled", cancelled_at=int(time.time()))
        return batch

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "batch not found", code="not_found")
        return _json(self._look(batch))

    async def list_batches(self, request: web.Request) -> web.Response:
        return _page(request, [self._look(b) for b in reversed(self.batches.values())])  # newest first

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "batch not found", code="not_found")
        if batch["status"] not in ("validating", "in_progress"):
            return _error(400, f"cannot cancel a batch with status {batch['status']}", code="invalid_state")
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        return _json(batch)
