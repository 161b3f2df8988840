"""The memory phase: at least `--mem-requests` more requests through the plain proxy after the table's runs,
half of them streamed, then its resident memory (VmRSS) and peak (VmHWM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.errors import BenchError
from bench.procfs import memory_mb

if TYPE_CHECKING:
    from bench.session import Bench


def memory_phase(bench: Bench) -> None:
    """At least `--mem-requests` more requests (half streamed) through the proxy, then its VmRSS/VmHWM."""
    target = bench.args.mem_requests
    if target <= 0:
        return
    if not bench.proxy.alive():
        bench.restart_proxy()
    before = bench.proxy_requests
    bench.memory["rss_before_phase_mb"] = round(memory_mb(bench.proxy.pid)["VmRSS"], 1)
    bench.memory["requests_before_phase"] = before
    rates = [r.rps for r in bench.runs if r.side == "proxy" and r.connections > 1]
    done_here, errors, rate = 0, 0, (sum(rates) / len(rates) if rates else 3000.0)
    bench.log(f"  memory: driving {target:,} requests (half streamed, 16 conn) through the proxy")
    samples = []
    while done_here < target:
        seconds = min(30.0, max(2.0, (target - done_here) / rate * 1.05 + 0.5))
        raw = bench.wrk.run(bench.url("proxy"), "mixed", 16, seconds)
        if not bench.proxy.alive():
            raise BenchError(f"the proxy exited during the memory phase:\n{bench.proxy.tail()}")
        done_here += raw["requests"]
        errors += sum(v for k, v in raw.items() if k.startswith("err_"))
        rate = max(raw["requests"] / (raw["duration_us"] / 1e6), 100.0)
        samples.append([done_here, round(memory_mb(bench.proxy.pid)["VmRSS"], 1)])
    bench.served["proxy"] += done_here
    mem = memory_mb(bench.proxy.pid)
    bench.memory.update(
        phase_requests=done_here,
        phase_errors=errors,
        total_requests=bench.proxy_requests,
        rss_after_mb=round(mem["VmRSS"], 1),
        hwm_mb=round(mem["VmHWM"], 1),
        rss_samples=samples,
    )
    bench.log(f"  memory: {done_here:,} requests, RSS {mem['VmRSS']:.1f} MB (peak {mem['VmHWM']:.1f} MB)")
