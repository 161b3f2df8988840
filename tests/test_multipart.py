"""The held upload's parser and encoder (proxy/upstream/multipart.py): what real clients send parses, what is
not a form is a 400 naming why, and an attempt's body is what aiohttp's own parser reads back."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from proxy.app.errors import ProxyError
from proxy.upstream.multipart import Form, boundary_of, parse

CT = "multipart/form-data; boundary=b0undary"


def body(*parts: bytes, preamble: bytes = b"") -> bytes:
    return preamble + b"".join(b"--b0undary\r\n" + p + b"\r\n" for p in parts) + b"--b0undary--\r\n"


FILE = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--x'


def test_fields_files_and_a_preamble():
    raw = body(b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper', FILE,
               b'Content-Disposition: form-data; name="g[]"\r\n\r\nword',
               b'Content-Disposition: form-data; name="g[]"\r\n\r\nsegment', preamble=b"ignored\r\n")
    fields, files = parse(raw, CT)
    assert fields == {"model": "whisper", "g[]": ["word", "segment"]}
    [file] = files
    assert (file.name, file.filename, file.content_type, bytes(file.data)) == ("file", "a.wav", "audio/wav",
                                                                                b"RIFF\r\n--x")


@pytest.mark.parametrize("content_type, expected", [
    ('multipart/form-data; boundary="quoted b"', b"quoted b"),
    ("Multipart/Form-Data;boundary=abc;charset=utf-8", b"abc"),
])
def test_boundaries(content_type, expected):
    assert boundary_of(content_type) == expected


async def test_a_file_name_that_is_not_ascii_reaches_the_upstream_unchanged(aiohttp_server):
    raw = body('Content-Disposition: form-data; name="file"; filename="Grüße 🎉.wav"\r\n\r\nx'.encode())
    fields, [file] = parse(raw, CT)
    assert file.filename == "Grüße 🎉.wav"
    form = Form(raw, {"model": "m"}, file)
    seen = {}

    async def handler(request: web.Request) -> web.Response:
        seen["name"] = (await request.post())["file"].filename
        return web.Response()

    app = web.Application()
    app.router.add_post("/", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{server.port}/", data=form.encode({"model": "m"}),
                                headers={"Content-Type": form.content_type}):
            pass
    assert seen["name"] == "Grüße 🎉.wav"


def test_a_quoted_filename_with_an_escaped_quote():
    raw = body(b'Content-Disposition: form-data; name="file"; filename="say \\"hi\\".wav"\r\n\r\nx')
    _, [file] = parse(raw, CT)
    assert file.filename == 'say "hi".wav' and file.content_type == "application/octet-stream"


@pytest.mark.parametrize("raw, content_type, fragment", [
    (b"x", "application/json", "must be multipart/form-data"),
    (b"x", "multipart/form-data", "no valid boundary"),
    (b"no delimiter here", CT, "no part"),
    (b"--b0undary\r\nContent-Disposition: form-data; name=\"m\"\r\n\r\nv", CT, "cut short"),
    (body(b"Content-Disposition: form-data\r\n\r\nv"), CT, "has no name"),
    (body(b'Content-Disposition: form-data; name="m"\r\n\r\n\xff\xfe'), CT, "not UTF-8"),
])
def test_what_is_not_a_form_is_a_400(raw, content_type, fragment):
    with pytest.raises(ProxyError) as info:
        parse(raw, content_type)
    assert info.value.status == 400 and fragment in info.value.message


async def test_an_attempts_body_reads_back_with_aiohttps_parser(aiohttp_server):
    raw = body(b'Content-Disposition: form-data; name="model"\r\n\r\nm1', FILE)
    fields, [file] = parse(raw, CT)
    form = Form(raw, fields, file)
    fields = {**fields, "model": "m2", "g[]": ["a", "b"], "prompt": 'quote " and\r\nnewline'}
    seen = {}

    async def handler(request: web.Request) -> web.Response:
        post = await request.post()
        seen["fields"] = [(k, v) for k, v in post.items() if isinstance(v, str)]
        upload = post["file"]
        seen["file"] = (upload.filename, upload.content_type, upload.file.read())
        return web.Response()

    app = web.Application()
    app.router.add_post("/", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{server.port}/", data=form.encode(fields),
                                headers={"Content-Type": form.content_type}) as resp:
            assert resp.status == 200
    assert seen["fields"] == [("model", "m2"), ("g[]", "a"), ("g[]", "b"), ("prompt", 'quote " and\r\nnewline')]
    assert seen["file"] == ("a.wav", "audio/wav", b"RIFF\r\n--x")
