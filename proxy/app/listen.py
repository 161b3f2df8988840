"""Serving an aiohttp app until SIGINT or SIGTERM: what `web.run_app` does, with the socket bound first.

`web.run_app` printed its banner before it bound, let an out-of-range port through to the OS (which took it
modulo 65536), and ended a taken port or an unresolvable host in a traceback. Here the port is checked, the
socket bound, and only then is "listening" printed with the port actually bound; a failure is one
`ListenError` line. On SIGINT or SIGTERM an app with a `Drain` drains (proxy/app/drain.py: /readyz 503, then
the listener closes, in-flight requests finish or are cut, the exporter flushes); one without stops at once.
Then the app's cleanup runs.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Callable

from aiohttp import web
from aiohttp.web_runner import GracefulExit


class ListenError(Exception):
    """The server could not start listening; the message says why in one line."""


def check_port(port: int, where: str = "--port") -> int:
    if not 0 <= port <= 65535:
        raise ListenError(f"{where}: must be a port number from 0 to 65535, got {port}")
    return port


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


REUSE_PORT = hasattr(socket, "SO_REUSEPORT")


def serve(app: web.Application, host: str, port: int, banner: Callable[[str], None],
          loop: asyncio.AbstractEventLoop, *, drain=None, reuse_port: bool = False, **runner_args) -> None:
    """Runs `app` on host:port until a signal; `banner(url)` is called once the socket is bound. With `drain`
    (a proxy.app.drain.Drain) a signal drains first. `reuse_port`: several processes listen on the port
    (SO_REUSEPORT, `--workers`), and the kernel spreads new connections between them."""
    check_port(port)

    async def run() -> None:
        runner = web.AppRunner(app, **runner_args)
        await runner.setup()
        stop = asyncio.Event()

        def on_signal() -> None:
            if drain is None or drain.signal():
                stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        try:
            try:
                await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
            except OSError as exc:  # in use, not an address of this host, a name that does not resolve
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise ListenError(f"cannot listen on {url_of(host, port)}: {reason}") from None
            banner(url_of(host, runner.addresses[0][1]))
            await stop.wait()
            if drain is not None:
                await drain.run(runner)
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    main = loop.create_task(run())
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        try:
            loop.run_until_complete(main)
        except (asyncio.CancelledError, ListenError):
            pass
        _cancel_remaining(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
