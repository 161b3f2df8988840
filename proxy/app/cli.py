"""The `groq-proxy` command: serve, simulate, models, config."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import select
import sys
from dataclasses import replace

from proxy.app.config import CONFIG_ENV, MAX_WORKERS, Config, ConfigError, load_config
from proxy.app.errors import ProxyError
from proxy.app.listen import ListenError, check_port, serve
from proxy.telemetry.logs import BatchingHandler, emit, setup_logging


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship for
        return asyncio.new_event_loop()


def _say(line: str, stream=None) -> None:
    """A line for people and supervisors, flushed at once (tests and scripts wait for "listening")."""
    print(line, file=stream or sys.stderr, flush=True)


def _missing_keys(config: Config) -> list[str]:
    # api_key_env is a validated variable name (config refuses a pasted key), so naming it is safe.
    return [
        f"providers.{p.name}.api_key_env: the variable {p.api_key_env} is not set"
        for p in config.providers.values()
        if p.api_key_env and not p.api_key
    ]


def decide_simulation(args, config: Config) -> bool:
    """The embedded simulator runs when asked for, or when there is neither a config nor any provider key."""
    if args.simulate:
        return True
    no_config = not (args.config or os.environ.get(CONFIG_ENV))
    return no_config and bool(_missing_keys(config))


def cmd_serve(args) -> int:
    from proxy.app.early_sighup import hold

    hold()  # the console script held it already (proxy/app/entry.py); this covers a caller of main()
    from proxy.admin import catalogue
    from proxy.app.drain import DRAIN
    from proxy.app.server import STATE, build_app
    from proxy.app.workers import check_workers, prepare_worker, supervise

    if args.port is not None:
        _check_port_arg(args.port)
    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        raise ProxyError(400, f"--workers: must be from 1 to {MAX_WORKERS}, got {args.workers}")
    config = load_config(args.config)
    setup_logging(config.server.log_level)
    workers = args.workers if args.workers is not None else config.server.workers
    if workers != config.server.workers:  # --workers wins, also for what reads server.workers (the admin port)
        config = replace(config, server=replace(config.server, workers=workers))
    worker = args.worker_index is not None  # one of a supervisor's workers (proxy/app/workers.py)
    if workers > 1 and not worker:
        check_workers(config, workers)
    if workers > 1:  # the processes share one stderr: no write may interleave mid-line
        BatchingHandler.atomic_bytes = select.PIPE_BUF
    simulate = decide_simulation(args, config) or args.simulator_url is not None
    if not simulate:
        missing = _missing_keys(config)
        if missing:
            raise ConfigError(missing[0] + " (set it, or run `groq-proxy serve --simulate`)")
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    if not simulate and not args.no_check:
        catalogues, entries = loop.run_until_complete(catalogue.check(config))
        for name, cat in catalogues.items():
            if cat.models is None:
                emit(logging.WARNING, "catalogue_unavailable", provider=name, error=cat.error)
        missing = [e for e in entries if e.available is False]
        for e in missing:
            emit(logging.WARNING, "model_missing", where=e.where, target=e.target,
                 message=f"{e.target} is not in the provider's live catalogue; requests to it will fall over")
        if args.strict and (missing or any(c.models is None for c in catalogues.values())):
            print(f"groq-proxy: refusing to start (--strict): {len(missing)} configured model(s) missing"
                  + "".join(f"\n  {e.where}: {e.target}" for e in missing), file=sys.stderr)
            return 3
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    if workers > 1 and not worker:
        return supervise(args, config, workers, simulate, host, port, loop, _say)
    source = "simulated upstream" if simulate else config.source
    # A worker of a simulated proxy uses the supervisor's one simulator: every worker talks to the same upstream.
    app = build_app(config, simulate=simulate, simulator_url=args.simulator_url)
    if worker:
        banner = prepare_worker(app, args.worker_index, workers, args.worker_dir, _say)
    else:
        banner = lambda url: _say(f"groq-proxy listening on {url} ({source})")  # noqa: E731
    # Start-up objects live as long as the process: keep them out of the collector's full passes, and
    # collect the young generation less often (requests allocate much, and almost all of it dies young).
    gc.freeze()
    gc.set_threshold(7000, 20, 20)

    if args.workers is not None:  # a reload reads the file again: the flag still wins over its server.workers
        app[STATE].server_overrides = {"workers": workers}

    def listening(url: str) -> None:
        app[STATE].public_url = url  # where POST /admin/benchmark sends its runs from the admin port
        banner(url)

    serve(app, host, port, listening, loop, drain=app[DRAIN], reuse_port=worker, access_log=None)
    return 0


_SHARES = ("rate_429", "rate_5xx", "rate_cut")
_NON_NEGATIVE = ("ttft_ms", "tokens_per_s", "completion_tokens", "retry_after")


def check_simulate_args(args) -> None:
    """The simulator's knobs, refused in one line when out of range (a share above 1 would fail every request
    and look like a proxy bug; a negative delay would crash the first request)."""
    for name in _SHARES:
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise ProxyError(400, f"--{name.replace('_', '-')}: must be a share between 0 and 1, got {value}")
    for name in _NON_NEGATIVE:
        value = getattr(args, name)
        if not value >= 0:  # also refuses nan
            raise ProxyError(400, f"--{name.replace('_', '-')}: must be 0 or more, got {value}")
        if value == math.inf:  # a delay that holds every request forever, a pace that is none
            raise ProxyError(400, f"--{name.replace('_', '-')}: must be a finite number, got inf")
    from proxy.sim.simulator import MAX_COMPLETION_TOKENS

    if not 1 <= args.completion_tokens <= MAX_COMPLETION_TOKENS:
        raise ProxyError(400, f"--completion-tokens: must be from 1 to {MAX_COMPLETION_TOKENS}, "
                              f"got {args.completion_tokens}")
    _check_port_arg(args.port)


def _check_port_arg(port: int) -> None:
    try:
        check_port(port)
    except ListenError as exc:  # a usage error (exit 2), not a failure to listen (exit 1)
        raise ProxyError(400, str(exc)) from None


def cmd_simulate(args) -> int:
    from proxy.sim.simulator import build_simulator_app, config_from_args

    check_simulate_args(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # what the flags cannot say alone, e.g. --rate-429 plus --rate-5xx above 1
        raise ProxyError(400, f"simulate: {exc}") from None
    # No access log: as a load target it would be the bottleneck.
    serve(build_simulator_app(config), args.host, args.port,
          lambda url: _say(f"groq simulator listening on {url}/openai/v1 (and /v1)", sys.stdout), _new_loop(),
          access_log=None)
    return 0


def cmd_models(args) -> int:
    from proxy.admin import catalogue

    config = load_config(args.config)
    runner = None

    async def run() -> str:
        nonlocal config, runner
        if decide_simulation(args, config):
            from proxy.sim.simulator import start_simulator

            why = "--simulate" if args.simulate else "no key and no config"
            print(f"groq-proxy: {why}: checking against the built-in simulator", file=sys.stderr)
            runner, url = await start_simulator()
            config = config.with_base_urls(url)
        else:
            missing = _missing_keys(config)
            if missing:
                raise ConfigError(missing[0])
        try:
            catalogues, entries = await catalogue.check(config)
        finally:
            if runner is not None:
                await runner.cleanup()
        if args.json:
            import orjson

            return orjson.dumps(
                {
                    "providers": {n: {"models": sorted(c.models) if c.models is not None else None, "error": c.error}
                                  for n, c in catalogues.items()},
                    "entries": [{"where": e.where, "target": e.target, "available": e.available} for e in entries],
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        return catalogue.render(config, catalogues, entries)

    print(asyncio.run(run()))
    return 0


def cmd_config(args) -> int:
    """The effective config: the file over the built-in defaults, every default filled in, secrets masked (what
    GET /admin/config shows of a running proxy). A config error exits 2, as `serve` would (`server.workers`
    included: `serve --workers N` on the command line is not seen here)."""
    import orjson

    from proxy.admin.config_view import render
    from proxy.app.workers import check_workers
    from proxy.telemetry.logs import register_secrets

    config = load_config(args.config)
    check_workers(config, config.server.workers)  # what `serve` refuses with its workers, this refuses too
    register_secrets(*(key for p in config.providers.values() for key in p.api_keys), config.server.admin_key)
    try:
        print(orjson.dumps(orjson.loads(render(config)), option=orjson.OPT_INDENT_2).decode(), flush=True)
    except BrokenPipeError:  # `groq-proxy config | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_bench_model(args) -> int:
    from proxy.routing.latency import default_thresholds
    from proxy.admin.model_bench import BenchRequest, render, run_benchmark

    config = load_config(args.config)
    setup_logging("warning")
    req = BenchRequest.from_body({"model": args.model, "prompt": args.prompt, "runs": args.runs,
                                  "max_tokens": args.max_tokens, "temperature": args.temperature})
    vm = config.models.get(req.model)
    thresholds = vm.latency if vm else default_thresholds(req.model)

    def progress(result) -> None:
        if result.ok:
            print(f"run {result.run}/{req.runs}: {result.latency_ms:.1f} ms, ttft {result.ttft_ms} ms, "
                  f"{result.tokens_per_s} tok/s, {result.model} ({result.category})", file=sys.stderr, flush=True)
        else:
            print(f"run {result.run}/{req.runs}: failed: {result.error}", file=sys.stderr, flush=True)

    async def run() -> dict:
        if args.url:
            return await run_benchmark(args.url, req, thresholds, progress=progress)
        # No running proxy named: start one in this process on a free port, on the same config.
        from aiohttp import web

        from proxy.app.server import build_app

        simulate = decide_simulation(args, config)
        if not simulate and _missing_keys(config):
            raise ConfigError(_missing_keys(config)[0] + " (or pass --url of a running proxy, or --simulate)")
        runner = web.AppRunner(build_app(config, simulate=simulate), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            return await run_benchmark(f"http://127.0.0.1:{port}", req, thresholds, progress=progress)
        finally:
            await runner.cleanup()

    loop = _new_loop()
    try:
        report = loop.run_until_complete(run())
    finally:
        loop.close()
    if args.json:
        import orjson

        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(report))
    return 0 if report["summary"]["succeeded"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groq-proxy", description="OpenAI-compatible gateway in front of Groq.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help=f"TOML config file (default: ${CONFIG_ENV}, else the built-in config)")
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument("--simulate", action="store_true", help="answer from the built-in simulator, not the providers")
    serve.add_argument("--strict", action="store_true", help="refuse to start when a configured model is missing")
    serve.add_argument("--no-check", action="store_true", help="skip the model-catalogue check at start")
    serve.add_argument("--workers", type=int, help="worker processes on the port (default: server.workers, 1)")
    # Set by the supervisor for its workers (proxy/app/workers.py); not for people.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-dir", help=argparse.SUPPRESS)
    serve.add_argument("--simulator-url", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    simulate = sub.add_parser("simulate", help="run the Groq-like simulator as an upstream")
    from proxy.sim.simulator import add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)

    models = sub.add_parser("models", help="check configured models against the providers' live catalogues")
    models.add_argument("--config", help="TOML config file")
    models.add_argument("--simulate", action="store_true", help="check against the built-in simulator")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=cmd_models)

    show = sub.add_parser("config", help="print the effective config (the file over the built-in defaults) as JSON")
    show.add_argument("--config", help=f"TOML config file (default: ${CONFIG_ENV}, else the built-in config)")
    show.set_defaults(func=cmd_config)

    bench = sub.add_parser("bench-model", help="time streamed runs of one model through the proxy")
    bench.add_argument("--model", required=True, help="virtual or real model, e.g. tier-fast")
    bench.add_argument("--prompt", default="Write a short story about a robot.", help="the user message")
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--max-tokens", type=int, default=100)
    bench.add_argument("--temperature", type=float)
    bench.add_argument("--url", help="a running proxy (default: start one in this process)")
    bench.add_argument("--config", help="TOML config file (for the in-process proxy and the tier thresholds)")
    bench.add_argument("--simulate", action="store_true", help="the in-process proxy answers from the simulator")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.set_defaults(func=cmd_bench_model)

    from proxy.app.keys_cmd import add_keys_parser

    add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"groq-proxy: config error: {exc}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"groq-proxy: {exc.message}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"groq-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
