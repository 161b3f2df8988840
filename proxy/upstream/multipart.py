"""multipart/form-data: the held upload of an audio request, parsed once, sent again with each attempt's model.

A fall-over must send the same upload to the next model, so the body is held (up to `server.max_audio_bytes`)
and parsed into its fields and its file. The file's bytes are a view into the held body, never copied; each
attempt encodes a new body around them with its own `model` field (one join: the held body and one attempt's
body are the most memory a request takes, about twice the upload).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from proxy.app.errors import bad_request

_PARAM = re.compile(r';\s*([!#$%&\'*+.^`|~\w-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True, slots=True)
class FilePart:
    name: str
    filename: str
    content_type: str
    data: memoryview


def _params(value: str) -> dict[str, str]:
    out = {}
    for key, raw in _PARAM.findall(value):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        out[key.lower()] = raw
    return out


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data content type; a 400 when it is not one."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind != "multipart/form-data":
        raise bad_request(f"The body must be multipart/form-data, not {kind or 'without a content type'}.")
    boundary = _params(content_type).get("boundary")
    if not boundary or len(boundary) > 70:
        raise bad_request("The multipart/form-data content type has no valid boundary.")
    return boundary.encode("latin-1", errors="replace")


def parse(body: bytes, content_type: str) -> tuple[dict, list[FilePart]]:
    """The text fields (a name sent more than once: the list of its values) and the file parts of a body."""
    boundary = boundary_of(content_type)
    view = memoryview(body)
    delimiter = b"--" + boundary
    at = body.find(delimiter)
    if at < 0:
        raise bad_request("The multipart body has no part (its boundary does not occur in it).")
    fields: dict = {}
    files: list[FilePart] = []
    next_delimiter = b"\r\n" + delimiter
    while True:
        at += len(delimiter)
        if body.startswith(b"--", at):
            return fields, files
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            break
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            break
        headers = _part_headers(body[line_end + 2 : head_end])
        start = head_end + 4
        end = body.find(next_delimiter, start)
        if end < 0:
            break
        disposition = _params(";" + headers.get("content-disposition", "").partition(";")[2])
        name = disposition.get("name")
        if name is None:
            raise bad_request("A part of the multipart body has no name (Content-Disposition: form-data; name=...).")
        if "filename" in disposition:
            kind = headers.get("content-type", "application/octet-stream")
            files.append(FilePart(name, disposition["filename"], kind, view[start:end]))
        else:
            try:
                value = body[start:end].decode()
            except UnicodeDecodeError:
                raise bad_request(f"The form field '{name}' is not UTF-8 text.", param=name) from None
            previous = fields.get(name)
            if previous is None:
                fields[name] = value
            elif isinstance(previous, list):  # a repeated field (`timestamp_granularities[]`) keeps every value
                previous.append(value)
            else:
                fields[name] = [previous, value]
        at = end + 2
    raise bad_request("The multipart body is cut short: its closing boundary is missing.")


def _part_headers(raw: bytes) -> dict[str, str]:
    headers = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            # UTF-8, as browsers and httpx write a file name that is not ASCII (the HTML form encoding)
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", errors="replace")
    return headers


class Form:
    """A held upload: its fields (the pipeline's `ctx.body`, so `model` is replaced per attempt) and its file."""

    __slots__ = ("fields", "file", "boundary", "_raw", "_sent")

    def __init__(self, raw: bytes, fields: dict, file: FilePart) -> None:
        self._raw = raw  # what file.data views into
        self.fields = fields
        self.file = file
        self.boundary = "groq-proxy-" + os.urandom(12).hex()
        self._sent = frozenset(fields)  # the client's own fields; any other is a tier's (or a chain entry's) param

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def encode(self, fields: dict) -> bytes:
        """The body of one attempt: `fields` (the current model among them) and the file."""
        delimiter = f"--{self.boundary}\r\n"
        out = []
        sent = self._sent
        for name, value in fields.items():
            if name in sent:  # as the client sent it: a string, or a repeated field's strings
                items = [(name, one) for one in value] if isinstance(value, list) else ((name, value),)
            else:
                items = form_items(name, value)
                if any(key in sent for key, _ in items):
                    continue  # the client set it itself (`timestamp_granularities[]` over the param's list)
            for key, one in items:
                part = f'{delimiter}Content-Disposition: form-data; name="{quote(key)}"\r\n\r\n{one}\r\n'
                out.append(part.encode())
        f = self.file
        out.append(f'{delimiter}Content-Disposition: form-data; name="{quote(f.name)}"; '
                   f'filename="{quote(f.filename)}"\r\nContent-Type: {f.content_type}\r\n\r\n'.encode())
        out.append(f.data)
        out.append(f"\r\n--{self.boundary}--\r\n".encode())
        return b"".join(out)


def form_items(name: str, value) -> list[tuple[str, str]]:
    """A config value (a tier's param: TOML's types) as the form fields openai-python sends for it: a boolean as
    `true` / `false`, a number as its literal, a list as repeated `name[]`, a table as `name[key]`, nothing for
    None (its query-string encoding with brackets, which the OpenAI and Groq APIs read)."""
    if value is None:
        return []
    if isinstance(value, bool):
        return [(name, "true" if value else "false")]
    if isinstance(value, (list, tuple)):
        key = name if name.endswith("[]") else name + "[]"
        return [item for one in value for item in form_items(key, one)]
    if isinstance(value, dict):
        return [item for k, one in value.items() for item in form_items(f"{name}[{k}]", one)]
    return [(name, str(value))]


def quote(value: str) -> str:
    """A name or file name inside a Content-Disposition's quotes, written as httpx writes it (a backslash as a
    quoted-pair, which aiohttp and the provider read back; `"`, CR and LF percent-encoded as browsers do)."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
