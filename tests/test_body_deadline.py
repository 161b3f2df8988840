"""`body_timeout_s`: a body passed on as it arrives must be whole that long after its request, however the
provider paces it. A raw asyncio server that drips one byte at a time, each well within timeout_s of the last,
for ever: the download is cut (never passed off as whole) and the upstream connection closed."""

from __future__ import annotations

import asyncio

import openai
import pytest

from proxy.app.config import ConfigError
from tests.conftest import config_for, read_request


class Drip:
    """Answers 200 with a Content-Length it never reaches: one byte every `every_s`, until the peer leaves."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.cut = False  # the peer closed the connection (the server never does)
        self.closed = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n")
        try:
            while True:
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(self.every_s)
        except ConnectionError:
            self.cut = True
        finally:
            self.closed.set()


async def test_a_dripping_download_is_cut_at_body_timeout_s(raw_server, start_proxy):
    drip = Drip(0.1)  # ten a second: never a silence near timeout_s
    port = await raw_server(drip)
    base = await start_proxy(config_for(f"http://127.0.0.1:{port}/openai/v1",
                                        provider={"timeout_s": 1, "body_timeout_s": 2}))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.APIConnectionError):  # a cut transfer, never a short file taken for whole
            await client.files.content("file_abc")
    await asyncio.wait_for(drip.closed.wait(), 30)
    assert drip.cut  # the proxy gave the provider's connection up


def test_body_timeout_s_is_checked_at_start():
    assert config_for("http://127.0.0.1:1/v1").providers["up"].body_timeout_s == 600.0
    assert config_for("http://127.0.0.1:1/v1", provider={"timeout_s": 900}).providers["up"].body_timeout_s == 900.0
    with pytest.raises(ConfigError, match=r"providers\.up\.body_timeout_s: must be at least timeout_s"):
        config_for("http://127.0.0.1:1/v1", provider={"timeout_s": 60, "body_timeout_s": 30})
