"""The load: wrk with a Lua script per mode (the POST body, and a `done()` that prints the totals and percentiles
as one JSON line), and one measured run of it with the CPU each process and the machine used meanwhile."""

from __future__ import annotations

import json
import math
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError
from bench.processes import pinned
from bench.procfs import cpu_seconds, machine_cpu_seconds

PLAIN_BODY = '{"model":"tier-fast","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = '{"model":"tier-fast","messages":[{"role":"user","content":"hi"}],"stream":true}'
MODES = ("non-stream", "stream")

# wrk prints one machine-readable line at the end of every run (latencies are in microseconds).
LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"mean_us":%.1f,"max_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def lua_fixed(body: str) -> str:
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + LUA_DONE
    )


LUA_MIXED = (
    f"""
local plain, stream, n = nil, nil, 0
init = function(args)
  local h = {{["Content-Type"] = "application/json"}}
  plain = wrk.format("POST", nil, h, '{PLAIN_BODY}')
  stream = wrk.format("POST", nil, h, '{STREAM_BODY}')
end
request = function()
  n = n + 1
  if n % 2 == 0 then return stream end
  return plain
end
"""
    + LUA_DONE
)


@dataclass
class Run:
    mode: str
    connections: int
    side: str  # "direct", "pass-through", "proxy" or "proxy+tracing"
    round: int = 1  # with --repeat N, which of the N interleaved rounds (1..N)
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    # Cores used during the run: per process, by other processes, in interrupts, stolen by the hypervisor.
    cpu_cores: dict = field(default_factory=dict)
    cpu_us_per_request: float = 0.0  # CPU per request of the measured side's process (direct: the upstream)
    raw: dict = field(default_factory=dict)


class Wrk:
    def __init__(self, workdir: Path, threads: int, cpu: int | None) -> None:
        self.workdir = workdir
        self.threads = threads
        self.cpu = cpu
        self.scripts = {
            "non-stream": self._script("plain.lua", lua_fixed(PLAIN_BODY)),
            "stream": self._script("stream.lua", lua_fixed(STREAM_BODY)),
            "mixed": self._script("mixed.lua", LUA_MIXED),
        }

    def _script(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def run(self, url: str, mode: str, connections: int, seconds: float) -> dict:
        argv = pinned(
            [
                "wrk", "-t", str(min(self.threads, connections)), "-c", str(connections),
                "-d", f"{max(1, math.ceil(seconds))}s", "--timeout", "5s", "-s", str(self.scripts[mode]), url,
            ],
            self.cpu,
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        for line in done.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                return json.loads(line[len("BENCH_JSON "):])
        raise BenchError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def measure(wrk: Wrk, url: str, mode: str, connections: int, seconds: float, side: str, watched: dict) -> Run:
    """One measured wrk run, with the CPU each process and the whole machine used meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine, start = machine_cpu_seconds(), time.monotonic()
    raw = wrk.run(url, mode, connections, seconds)
    wall = time.monotonic() - start
    after = {name: cpu_seconds(pid) for name, pid in watched.items()}
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cores = {name: (after[name] - before[name]) / wall for name in watched}
    cores["wrk"] = (
        children_after.ru_utime + children_after.ru_stime - children.ru_utime - children.ru_stime
    ) / wall
    machine_after = machine_cpu_seconds()
    ours = sum(cores.values())
    cores["other"] = max(0.0, (machine_after["tasks"] - machine["tasks"]) / wall - ours)
    cores["irq"] = (machine_after["irq"] - machine["irq"]) / wall
    cores["steal"] = (machine_after["steal"] - machine["steal"]) / wall
    secs = raw["duration_us"] / 1e6
    errors = sum(v for k, v in raw.items() if k.startswith("err_"))
    measured = "upstream" if side == "direct" else side
    return Run(
        mode=mode, connections=connections, side=side,
        rps=raw["requests"] / secs if secs else 0.0,
        p50_ms=raw["p50_us"] / 1000, p90_ms=raw["p90_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000, max_ms=raw["max_us"] / 1000,
        requests=raw["requests"], seconds=secs, errors=errors,
        cpu_cores={k: round(v, 3) for k, v in cores.items()},
        cpu_us_per_request=sum(after[n] - before[n] for n in watched if n == measured or n.startswith(measured + "/"))
        * 1e6 / raw["requests"] if raw["requests"] else 0.0,
        raw=raw,
    )
