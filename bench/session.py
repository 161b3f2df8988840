"""One run of the benchmark: the sides it started (and restarts when one dies), and the table's runs: each
(mode, connections) cell's sides measured one after the other, `--repeat` times in rotated order, each run after
a warm-up and a wait for the cores to be quiet, measured again when other work disturbed it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.errors import BenchError
from bench.load import Run, Wrk, measure
from bench.processes import Process
from bench.procfs import NOISY_CORES, children, memory_mb, others_cores
from bench.sides import (
    CACHE_SIDES, DIRECT_PATH, HOST, PROXY_PATH, cache_config, check_answers, is_proxy_side, prime_cache,
    start_passthrough, start_proxy, start_sink, start_upstream,
)
from bench.stats import noise
from bench.tracing import check_export


class Bench:
    def __init__(self, args, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.upstream: Process | None = None
        self.passthrough: Process | None = None
        self.sink: Process | None = None  # the OTLP receiver (--tracing)
        self.redis: Process | None = None  # the cache-redis side's Redis (--cache)
        self.redis_port = 0
        self.passthrough_port = 0
        self.upstream_port = 0
        self.sink_port = 0
        self.procs: dict[str, Process] = {}  # "proxy", and "proxy+tracing" with --tracing
        self.ports: dict[str, int] = {}
        self.served: dict[str, int] = {}  # requests served by the current process of each proxy, as counted by wrk
        self.restarts: dict[str, int] = {}
        self.runs: list[Run] = []
        self.memory: dict = {}
        self.tracing: dict = {}  # sink totals, the exporter's counters, the tracing proxy's memory
        self.notes: list[str] = []
        pin = args.pin
        self.cpu_proxy, self.cpu_upstream, self.cpu_wrk = (1, 0, 0) if pin else (None, None, None)
        self.wrk = Wrk(workdir, args.threads, self.cpu_wrk)

    # The plain proxy, under the names the memory phase and the report use.
    @property
    def proxy(self) -> Process | None:
        return self.procs.get("proxy")

    @property
    def proxy_port(self) -> int:
        return self.ports.get("proxy", 0)

    @property
    def proxy_requests(self) -> int:
        return self.served.get("proxy", 0)

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def start(self) -> None:
        self.upstream, self.upstream_port = start_upstream(self.workdir, self.args.upstream_chunked, self.cpu_upstream)
        check_answers(self.upstream_port, DIRECT_PATH, via_proxy=False)
        self._start_proxy("proxy")
        self.log(f"canned upstream on :{self.upstream_port} (pid {self.upstream.pid}), "
                 f"proxy on :{self.proxy_port} (pid {self.proxy.pid}, log_level={self.args.log_level})")
        if self.args.baseline:
            self.passthrough, self.passthrough_port = start_passthrough(
                self.workdir, self.upstream_port, self.cpu_proxy)
            check_answers(self.passthrough_port, PROXY_PATH, via_proxy=False)
            self.log(f"pass-through on :{self.passthrough_port} (pid {self.passthrough.pid})")
        if self.args.workers:
            side = f"proxy-{self.args.workers}w"
            self._start_proxy(side)
            self.log(f"{side} on :{self.ports[side]} (supervisor pid {self.procs[side].pid}, "
                     f"workers {children(self.procs[side].pid)})")
        if self.args.tracing:
            self.sink, self.sink_port = start_sink(self.workdir, self.cpu_upstream)
            self._start_proxy("proxy+tracing")
            check_export(self)
            self.log(f"OTLP sink on :{self.sink_port} (pid {self.sink.pid}), proxy+tracing on "
                     f":{self.ports['proxy+tracing']} (pid {self.procs['proxy+tracing'].pid}, every request traced)")
        if self.args.cache:
            from bench.policies import start_redis

            self.redis, self.redis_port = start_redis(self.workdir)
            for side in CACHE_SIDES:
                self._start_proxy(side)
            self.log(f"cache sides: cache-memory on :{self.ports['cache-memory']}, cache-redis on "
                     f":{self.ports['cache-redis']} (Redis on :{self.redis_port})")

    def _start_proxy(self, side: str) -> None:
        sink_port = self.sink_port if side == "proxy+tracing" else 0
        extra = cache_config(side, self.redis_port) if side in CACHE_SIDES else ""
        proc, port = start_proxy(self.workdir, self.upstream_port, self.args.log_level, self.cpu_proxy, side, sink_port,
                                 extra=extra)
        self.procs[side], self.ports[side], self.served[side] = proc, port, 0
        if side == "proxy":
            self.memory["rss_start_mb"] = round(memory_mb(proc.pid)["VmRSS"], 1)
        elif side == "proxy+tracing":
            self.tracing["rss_start_mb"] = round(memory_mb(proc.pid)["VmRSS"], 1)
        check_answers(port, PROXY_PATH, via_proxy=True)
        self.served[side] += 2


    def stop(self) -> None:
        for proc in (*self.procs.values(), self.passthrough, self.sink, self.upstream, self.redis):
            if proc is not None:
                proc.stop()

    @property
    def sides(self) -> tuple[str, ...]:
        sides = ("direct", "pass-through", "proxy") if self.args.baseline else ("direct", "proxy")
        if self.args.workers:  # right after the one-worker proxy, so the two stay neighbours in every round
            sides = (*sides, f"proxy-{self.args.workers}w")
        sides = (*sides, "proxy+tracing") if self.args.tracing else sides
        return (*sides, *CACHE_SIDES) if self.args.cache else sides

    def url(self, side: str) -> str:
        if is_proxy_side(side):
            return f"http://{HOST}:{self.ports[side]}{PROXY_PATH}"
        if side == "pass-through":
            return f"http://{HOST}:{self.passthrough_port}{PROXY_PATH}"
        return f"http://{HOST}:{self.upstream_port}{DIRECT_PATH}"

    def watched(self) -> dict[str, int]:
        pids = {side: proc.pid for side, proc in self.procs.items()}
        for side, proc in self.procs.items():  # a --workers supervisor's workers: "proxy-2w/1234"
            pids.update((f"{side}/{child}", child) for child in children(proc.pid))
        pids["upstream"] = self.upstream.pid
        if self.passthrough is not None:
            pids["pass-through"] = self.passthrough.pid
        if self.sink is not None:
            pids["otlp-sink"] = self.sink.pid
        if self.redis is not None:
            pids["redis"] = self.redis.pid
        return pids

    def wait_quiet(self) -> None:
        """Waits (up to --quiet-wait seconds) until other work on the machine leaves the cores to the bench."""
        deadline = time.monotonic() + self.args.quiet_wait
        said = False
        while True:
            busy = others_cores(list(self.watched().values()))
            if busy < NOISY_CORES or time.monotonic() >= deadline:
                return
            if not said:
                self.log(f"  waiting for other work to calm down ({busy:.2f} cores busy outside the bench)")
                said = True

    def one(self, mode: str, connections: int, side: str, round_: int = 1) -> Run:
        """One measured run after a warm-up; measured again once when other work disturbed it (the quieter
        of the two is kept), and once when the proxy died during it."""
        best: Run | None = None
        is_proxy = is_proxy_side(side)
        for attempt in range(self.args.remeasure + 2):
            if is_proxy and not self.procs[side].alive():
                self.restart_proxy(side)
            if side in CACHE_SIDES:
                prime_cache(self.ports[side], mode)
            self.wait_quiet()
            if self.args.warmup > 0:
                warm = self.wrk.run(self.url(side), mode, connections, self.args.warmup)
                if is_proxy:
                    self.served[side] += warm["requests"]
            run = measure(self.wrk, self.url(side), mode, connections, self.args.duration, side, self.watched())
            run.round = round_
            if is_proxy:
                self.served[side] += run.requests
                if not self.procs[side].alive():
                    self.log(f"  the {side} exited during the run; restarting it and measuring again:\n"
                             f"{self.procs[side].tail()}")
                    continue
            if best is None or noise(run) < noise(best):
                best = run
            if noise(best) <= NOISY_CORES or attempt >= self.args.remeasure:
                break
            self.log(f"  {mode} {connections} conn {side}: {noise(run):.2f} cores taken by other work; measuring again")
        if best is None:
            raise BenchError(f"the {side} kept exiting during {mode} {connections} conn:\n{self.procs[side].tail()}")
        return best

    def restart_proxy(self, side: str = "proxy") -> None:
        self.procs[side].stop()
        self.restarts[side] = self.restarts.get(side, 0) + 1
        self.notes.append(f"the {side} exited and was restarted ({self.restarts[side]}x); see its log"
                          + ("; its exporter counters cover only the last process" if side != "proxy" else ""))
        self._start_proxy(side)

    def table_runs(self) -> None:
        """Each (mode, connections) cell: the sides one after the other, `--repeat` times. Round r starts
        r-1 places further along the sides (direct, pass-through, proxy, proxy+tracing, then pass-through,
        proxy, proxy+tracing, direct, ...), so no side is always measured first, and a drift in the machine's
        speed over the cell falls on every side alike. The neighbours stay: proxy+tracing runs right after
        proxy in every round but the one it opens, which keeps the per-round comparison of the two close."""
        repeat = self.args.repeat
        for mode in self.args.modes:
            for connections in self.args.connections:
                for index in range(repeat):
                    shift = index % len(self.sides)
                    for side in (*self.sides[shift:], *self.sides[:shift]):
                        self._measure_into_table(mode, connections, side, index + 1)

    def _measure_into_table(self, mode: str, connections: int, side: str, round_: int) -> None:
        run = self.one(mode, connections, side, round_)
        self.runs.append(run)
        rounds = f"r{round_}/{self.args.repeat}  " if self.args.repeat > 1 else ""
        self.log(
            f"  {mode:<10} {connections:>3} conn  {rounds}{side:<13} {run.rps:>9,.0f} req/s  "
            f"p50 {run.p50_ms:6.3f} ms  p99 {run.p99_ms:6.3f} ms  {run.cpu_us_per_request:5.0f} us/req"
            + (f"  others {noise(run):.2f}" if noise(run) > NOISY_CORES else "")
            + (f"  ERRORS {run.errors}" if run.errors else "")
        )
