"""What the bench's helper servers share: the command line, the uvloop loop, the listening socket, the
`listening on http://HOST:PORT` line bench/processes.py waits for, and a clean stop on SIGINT/SIGTERM.

Used by canned_upstream.py and otlp_sink.py (raw asyncio protocols: `serve_forever`) and by passthrough.py
(an aiohttp app: `new_event_loop`, `listening_socket`, `announce`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from collections.abc import Callable

BACKLOG = 1024


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the `--host` and `--port` every helper server takes."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    return p


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop (the default asyncio loop when uvloop is missing), set as the current loop."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def announce(host: str, port: int) -> None:
    """The line bench/processes.py (start_announcing) parses to learn the port."""
    print(f"listening on http://{host}:{port}", flush=True)


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket (SO_REUSEADDR; port 0 picks a free one), for servers that take a socket. It
    listens before the port is announced: a caller that connects at once is queued, not refused."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


async def create_server(protocol_factory: Callable[[], asyncio.Protocol], host: str,
                        port: int) -> asyncio.AbstractServer:
    """A listening server on the running loop for a raw protocol."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(protocol_factory, host, port, backlog=BACKLOG, reuse_address=True)


def serve_forever(protocol_factory: Callable[[], asyncio.Protocol], host: str, port: int,
                  on_exit: Callable[[], None] | None = None) -> int:
    """Serves `protocol_factory` on a new uvloop loop until SIGINT or SIGTERM, after announcing the port;
    then closes the server and the loop and calls `on_exit` (e.g. to print final counts). Returns 0."""
    loop = new_event_loop()
    server = loop.run_until_complete(create_server(protocol_factory, host, port))
    announce(host, server.sockets[0].getsockname()[1])
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
        if on_exit is not None:
            on_exit()
    return 0
