"""The thinnest aiohttp + uvloop pass-through (aiohttp's server and its ClientSession): the reference figure.

It does what any proxy must and nothing else: read the body, POST it upstream on a pooled connection, and
return the answer (a stream is copied chunk by chunk). No routing, validation, fallback, logs or metrics.
`python -m bench.run --baseline` measures it beside the proxy; shared/reference/peers.md quotes about
10,000 req/s at 16 connections for it on a 2-core box.

    python -m bench.passthrough --upstream http://127.0.0.1:PORT/openai/v1/chat/completions --port 0
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

from bench import serving

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM], data=body, headers={"Content-Type": "application/json"}) as up:
        if up.content_type != "text/event-stream":
            return web.Response(body=await up.read(), status=up.status, content_type=up.content_type)
        response = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application):
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def main(argv: list[str] | None = None) -> int:
    parser = serving.parser("python -m bench.passthrough", __doc__)
    parser.add_argument("--upstream", required=True, help="the upstream chat-completions URL")
    args = parser.parse_args(argv)
    loop = serving.new_event_loop()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", forward)
    sock = serving.listening_socket(args.host, args.port)
    serving.announce(args.host, sock.getsockname()[1])
    web.run_app(app, sock=sock, access_log=None, print=None, loop=loop)  # aiohttp's own SIGINT/SIGTERM handling
    return 0


if __name__ == "__main__":
    sys.exit(main())
