"""Serving an aiohttp app until SIGINT or SIGTERM: what `web.run_app` does, with the socket bound first.

`web.run_app` printed its banner before it bound, let an out-of-range port through to the OS (which took it
modulo 65536), and ended a taken port or an unresolvable host in a traceback. Here the port is checked, the
socket bound, and only then is "listening" printed with the port actually bound; a failure is one
`ListenError` line. Signals and shutdown are run_app's: the runner's GracefulExit on SIGINT/SIGTERM, then
the app's cleanup (in-flight requests get the runner's shutdown timeout).
"""

from __future__ import annotations

import asyncio
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


def serve(app: web.Application, host: str, port: int, banner: Callable[[str], None],
          loop: asyncio.AbstractEventLoop, **runner_args) -> None:
    """Runs `app` on host:port until a signal; `banner(url)` is called once the socket is bound."""
    check_port(port)

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=True, **runner_args)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:  # in use, not an address of this host, a name that does not resolve
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise ListenError(f"cannot listen on {url_of(host, port)}: {reason}") from None
            banner(url_of(host, runner.addresses[0][1]))
            await asyncio.Event().wait()
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
