"""`groq-proxy serve --workers N`: N proxy processes on one port, and the supervisor that keeps them running.

One Python process serves on one core; a machine with more cores runs more processes. Each worker is a whole
`groq-proxy serve` of its own, started with hidden flags, that binds the port with SO_REUSEPORT: the kernel
spreads new connections between the workers' listening sockets, with no accept lock and no hand-off through
the supervisor. The supervisor binds the port first without listening (so `--port 0` means one port for all,
and a port in use is one line before any worker starts) and keeps that socket, which receives nothing, for
its lifetime.

The supervisor (this module) runs no proxy: it checks the config once (the catalogue check too), starts the
embedded simulator when there is no key (one simulator, so every worker talks to the same upstream), starts
the workers, prints "listening" once all are, and then:
- restarts a worker that exits on its own, logging `worker_exited` (error) and `worker_restarted`, waiting a
  little longer each time one dies young (0.5 s doubling to 10 s), so a crash loop does not spin a core;
- forwards SIGTERM and SIGINT (each worker drains, proxy/app/drain.py; a second one cuts the drain short),
  waits for every worker to exit, and exits 0 when each of them did;
- forwards SIGHUP (a worker reloads its config on it; one still starting gets it once it listens).

POST /admin/reload reaches one worker (the kernel's pick); that worker asks each sibling to reload too, over a
Unix socket in the run directory (`worker-I.reload.sock`), and answers once every one has, so a key revoked
by the reload is refused by every worker when the call returns.

Policies and caches on the memory store are per process: with N > 1 each worker would enforce every limit on
its own, so the start is refused unless `[store] backend = "redis"` (policies.config.check_workers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Callable

import orjson
from aiohttp import web

from proxy.app import early_sighup
from proxy.app.config import Config, ConfigError
from proxy.app.listen import ListenError, url_of
from proxy.telemetry.logs import emit

SIBLING_RELOAD_TIMEOUT_S = 30.0  # past it a sibling (stuck, or being restarted) is reported `unreachable`
RESTART_DELAY_S = (0.5, 10.0)  # first and largest wait before restarting a worker that died young
YOUNG_S = 10.0  # a worker that ran less than this before dying counts as a crash loop


# The kernel spreads a port's connections over its SO_REUSEPORT listeners on Linux only.
SUPPORTED = hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def check_workers(config: Config, workers: int) -> None:
    """What makes N > 1 workers impossible or wrong, as a config error that names the key."""
    if workers <= 1:
        return
    if not SUPPORTED:
        raise ConfigError(f"server.workers: {workers} workers need SO_REUSEPORT with load balancing (Linux); "
                          f"on {sys.platform} run one worker per process manager slot instead")
    if config.server.admin_port == 0:
        raise ConfigError(f"server.admin_port: 0 (any free port) would give each of the {workers} workers an admin "
                          "port of its own; name a port")
    from policies.config import check_workers as check_policies

    check_policies(config.policies, workers)


def reserve_port(host: str, port: int) -> socket.socket:
    """Binds host:port with SO_REUSEPORT without listening: the workers bind the same port beside it.
    SO_REUSEPORT would also let this bind share a port with another proxy's workers (same user): a port where
    something already answers is refused first."""
    if port:
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        try:
            with socket.create_connection((probe, port), timeout=1.0):
                pass
        except OSError:
            pass  # nothing listens there (or the name does not resolve: the bind below says so)
        else:
            raise ListenError(f"cannot listen on {url_of(host, port)}: Address already in use")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {url_of(host, port)}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {url_of(host, port)}: {exc.strerror or exc}") from None
    return sock


class Worker:
    __slots__ = ("index", "process", "ready", "started", "restarts", "reload_pending")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future | None = None
        self.started = 0.0
        self.restarts = 0
        self.reload_pending = False  # a SIGHUP came while it started: sent once it listens


class Supervisor:
    def __init__(self, workers: int, command: Callable[[int, str | None], list[str]]) -> None:
        self.workers = [Worker(i) for i in range(workers)]
        self._command = command  # worker index, simulator URL -> argv
        self._simulator_url: str | None = None
        self._stopping = False

    async def run(self, simulate: bool, banner: Callable[[], None]) -> int:
        loop = asyncio.get_running_loop()
        sim_runner = None
        if simulate:
            from proxy.sim.simulator import start_simulator

            sim_runner, self._simulator_url = await start_simulator()
            emit(logging.WARNING, "simulated_upstream",
                 message="Answering from the built-in simulator, not from Groq: --simulate was given, or neither "
                 "a config nor GROQ_API_KEY. Set GROQ_API_KEY (or give --config), without --simulate, to use Groq.",
                 simulator=self._simulator_url)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        sighup_before = early_sighup.install(loop, lambda: self._on_signal(signal.SIGHUP))
        early_sighup.take()  # one held during the start: no worker runs yet, and each reads the file as it starts
        try:
            for worker in self.workers:
                await self._spawn(worker)
            first = await self._first_start()
            if first is not None:
                return first
            banner()
            codes = await asyncio.gather(*(self._supervise(w) for w in self.workers))
            return 0 if all(code == 0 for code in codes) else 1
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if sighup_before is not None:
                early_sighup.restore(loop, sighup_before)
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
            if sim_runner is not None:
                await sim_runner.cleanup()

    def _on_signal(self, signum: int) -> None:
        if signum != signal.SIGHUP:
            self._stopping = True
        emit(logging.INFO, "supervisor_signal", signal=signal.Signals(signum).name,
             workers=sum(1 for w in self.workers if w.process is not None and w.process.returncode is None))
        for worker in self.workers:
            if _listening(worker):
                worker.process.send_signal(signum)
            elif signum == signal.SIGHUP and worker.process is not None and worker.process.returncode is None:
                # Still starting, it may have read the file already: it gets the SIGHUP once it listens (before
                # its Python code runs, a SIGHUP would end it). One still starting gets SIGTERM then too.
                worker.reload_pending = True

    async def _spawn(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.ready = loop.create_future()
        worker.reload_pending = False  # a new process reads the file as it starts
        # A session of its own: a signal to the supervisor's process group (Ctrl-C in a terminal, systemd's
        # control-group kill) reaches the worker once, forwarded, not twice (a second signal cuts the drain).
        worker.process = await asyncio.create_subprocess_exec(
            *self._command(worker.index, self._simulator_url),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, start_new_session=True)
        worker.started = loop.time()
        emit(logging.INFO, "worker_started", worker=worker.index, pid=worker.process.pid)
        loop.create_task(self._read_stdout(worker, worker.process, worker.ready))

    async def _read_stdout(self, worker: Worker, process, ready: asyncio.Future) -> None:
        """The worker's stdout: its "listening" line says it is ready; the rest is read and dropped."""
        while line := await process.stdout.readline():
            if not ready.done() and b"listening on" in line:
                ready.set_result(True)
                if self._stopping:  # the stop came while it started: it drains now
                    process.send_signal(signal.SIGTERM)
                elif worker.reload_pending:
                    worker.reload_pending = False
                    process.send_signal(signal.SIGHUP)
        if not ready.done():
            ready.set_result(False)

    async def _first_start(self) -> int | None:
        """Waits until every worker listens; a worker that exits first ends the start (its own stderr said why)."""
        for worker in self.workers:
            if not await worker.ready:
                code = await worker.process.wait()
                stopped = self._stopping  # a SIGTERM during the start: a stop, not a failure
                if not stopped:
                    emit(logging.ERROR, "worker_failed_to_start", worker=worker.index, code=_describe(code))
                self._stopping = True
                for other in self.workers:
                    if other.process.returncode is None:
                        other.process.terminate()
                        other.process.terminate()  # a second signal: no drain grace for a start that failed
                for other in self.workers:
                    await other.process.wait()
                return 0 if stopped else (code if code > 0 else 1)
        return None

    async def _supervise(self, worker: Worker) -> int:
        loop = asyncio.get_running_loop()
        delay = 0.0
        while True:
            code = await worker.process.wait()
            if self._stopping:
                if code != 0:
                    emit(logging.ERROR, "worker_exited", worker=worker.index, pid=worker.process.pid,
                         code=_describe(code))
                return code
            ran = loop.time() - worker.started
            delay = min(max(delay * 2, RESTART_DELAY_S[0]), RESTART_DELAY_S[1]) if ran < YOUNG_S else 0.0
            emit(logging.ERROR, "worker_exited", worker=worker.index, pid=worker.process.pid, code=_describe(code),
                 ran_s=round(ran, 3), restart_in_s=delay)
            if delay:
                await asyncio.sleep(delay)
            if self._stopping:
                return 0
            worker.restarts += 1
            await self._spawn(worker)
            if await worker.ready:
                emit(logging.WARNING, "worker_restarted", worker=worker.index, pid=worker.process.pid,
                     restarts=worker.restarts)


def prepare_worker(app, index: int, workers: int, directory: str, say: Callable[..., None]):
    """What makes a `serve` process one of a supervisor's workers; returns its "listening" banner, which goes
    to stdout, where the supervisor reads it."""
    from proxy.app.server import STATE, render_metrics
    from proxy.telemetry.worker_metrics import WORKER_METRICS, WorkerMetrics

    siblings = WorkerMetrics(directory, index, workers)
    app[WORKER_METRICS] = siblings  # its /metrics covers every worker
    app[RELOAD_SIBLINGS] = lambda: reload_siblings(directory, index, workers)  # POST /admin/reload: every worker
    app.cleanup_ctx.append(_reload_socket_ctx(directory, index))
    from proxy.admin.status import sibling_report
    from proxy.admin.status_workers import STATUS_SIBLINGS, WorkerStatus

    status = WorkerStatus(directory, index, workers)
    app[STATUS_SIBLINGS] = status  # its /status.json covers every worker
    app.cleanup_ctx.append(status.serve_ctx(sibling_report))
    if app[STATE].config.telemetry.metrics:
        app.cleanup_ctx.append(siblings.serve_ctx(render_metrics))
    follow_parent()
    # The supervisor forwards SIGHUP for a reload: held until the app's handler is in (entry.py held it already).
    early_sighup.hold()
    return lambda url: say(f"groq-proxy worker {index} listening on {url}", sys.stdout)


def _reload_socket(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.reload.sock")


def _reload_socket_ctx(directory: str, index: int):
    """An aiohttp cleanup_ctx: the Unix socket on which a sibling that took POST /admin/reload has this worker
    reload too; the answer is the reload's result as JSON (or `{"status": "refused", "error": ...}`)."""

    async def ctx(app: web.Application):
        from proxy.app.reload import ReloadRefused
        from proxy.app.server import STATE
        from proxy.telemetry.worker_metrics import sibling_socket

        async def produce() -> bytes:
            try:
                return orjson.dumps(await app[STATE].reloads.reload("sibling"))
            except ReloadRefused as exc:
                return orjson.dumps({"status": "refused", "error": str(exc)})

        async with sibling_socket(_reload_socket(directory, index), produce):
            yield

    return ctx


async def reload_siblings(directory: str, index: int, workers: int) -> dict[str, dict]:
    """Every other worker reloaded, each one's result by its index (`unreachable` for one that did not answer:
    being restarted, it reads the file anew anyway)."""
    from proxy.telemetry.worker_metrics import ask_sibling

    async def one(i: int) -> dict:
        answer = await ask_sibling(_reload_socket(directory, i), SIBLING_RELOAD_TIMEOUT_S)
        try:
            return orjson.loads(answer) if answer is not None else {"status": "unreachable"}
        except orjson.JSONDecodeError:
            return {"status": "unreachable"}

    others = [i for i in range(workers) if i != index]
    return {str(i): result for i, result in zip(others, await asyncio.gather(*(one(i) for i in others)))}


RELOAD_SIBLINGS = web.AppKey("reload_siblings", Callable)


def follow_parent() -> None:
    """In a worker: SIGTERM when the supervisor dies (even by SIGKILL), so no worker outlives it and holds the
    port. Linux's PR_SET_PDEATHSIG; workers run only where SO_REUSEPORT balances, which is Linux."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _listening(worker: Worker) -> bool:
    ready = worker.ready
    return (worker.process is not None and worker.process.returncode is None and ready is not None
            and ready.done() and ready.result())


def _describe(code: int) -> int | str:
    """An exit code, or the signal that ended the process (negative codes, as asyncio reports them)."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return code
    return code


def worker_command(args, host: str, port: int, workers: int, directory: str):
    """The argv of worker I: this same `serve`, with the port bound and the checks already done."""
    base = [sys.executable, "-m", "proxy", "serve", "--host", host, "--port", str(port), "--no-check",
            "--workers", str(workers), "--worker-dir", directory]
    if args.config:
        base += ["--config", args.config]

    def command(index: int, simulator_url: str | None) -> list[str]:
        extra = ["--worker-index", str(index)]
        if simulator_url is not None:
            extra += ["--simulator-url", simulator_url]
        return base + extra

    return command


def supervise(args, config: Config, workers: int, simulate: bool, host: str, port: int,
              loop: asyncio.AbstractEventLoop, say: Callable[[str], None]) -> int:
    """Runs the supervisor until its workers have drained and exited; the exit code of the command."""
    reserved = reserve_port(host, port)
    port = reserved.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="groq-proxy-workers-")  # 0700: the workers' metrics sockets
    source = "simulated upstream" if simulate else config.source
    supervisor = Supervisor(workers, worker_command(args, host, port, workers, directory))
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(supervisor.run(
            simulate, lambda: say(f"groq-proxy listening on {url_of(host, port)} ({source}, {workers} workers)")))
    finally:
        reserved.close()
        shutil.rmtree(directory, ignore_errors=True)
        loop.close()

