"""The tracing side's own figures (--tracing): that the check requests' spans reach the OTLP sink before the
load, and after the table's runs the sink's totals, the tracing proxy's exporter counters from its /metrics, and
its memory."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from bench.errors import BenchError
from bench.procfs import cpu_seconds, memory_mb
from bench.sides import http_call

if TYPE_CHECKING:
    from bench.session import Bench

SPANS_PER_REQUEST = 2  # the proxy exports a server span and one attempt span per answered request
TRACE_METRICS = ("groq_proxy_trace_spans_exported_total", "groq_proxy_trace_spans_dropped_total")


def metric_lines(port: int, names: tuple[str, ...]) -> list[str]:
    """The sample lines of the named metrics in a proxy's GET /metrics."""
    status, _, body = http_call(port, "GET", "/metrics")
    if status != 200:
        raise BenchError(f"GET /metrics on port {port} answered {status}: {body[:200]!r}")
    return [ln for ln in body.decode(errors="replace").splitlines() if ln.split("{", 1)[0].split(" ", 1)[0] in names]


def metric_sum(lines: list[str], name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.split("{", 1)[0].split(" ", 1)[0] == name)


def sink_stats(port: int) -> dict:
    """The OTLP sink's counts: export requests, bytes, connections, first and last arrival."""
    status, _, body = http_call(port, "GET", "/stats")
    if status != 200:
        raise BenchError(f"the OTLP sink answered GET /stats with {status}: {body[:200]!r}")
    return json.loads(body)


def check_export(bench: Bench) -> None:
    """The spans of the check requests must reach the sink (the exporter sends every export_interval_s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sink_stats(bench.sink_port)["requests"] > 0:
            return
        if not bench.procs["proxy+tracing"].alive():
            break
        time.sleep(0.2)
    raise BenchError(f"the proxy+tracing exported no spans to the OTLP sink on :{bench.sink_port} within 10 s:\n"
                     f"{bench.procs['proxy+tracing'].tail()}\n  sink log:\n{bench.sink.tail()}")


def collect_tracing(bench: Bench) -> None:
    """After the table's runs: the sink's totals and the tracing proxy's exporter counters, once the
    exporter has sent what it still held (the counters stop moving), and the tracing proxy's memory."""
    if not bench.args.tracing:
        return
    side = "proxy+tracing"
    proc, port = bench.procs[side], bench.ports[side]
    if not proc.alive():
        bench.notes.append("the proxy+tracing had exited before its exporter counters were read")
        return
    lines, last, deadline = [], None, time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = metric_lines(port, TRACE_METRICS)
        now = (metric_sum(lines, TRACE_METRICS[0]), metric_sum(lines, TRACE_METRICS[1]))
        if now == last:
            break
        last = now
        time.sleep(2.5)  # more than the exporter's interval (1 s) plus one batch
    stats = sink_stats(bench.sink_port)
    mem = memory_mb(proc.pid)
    exported = metric_sum(lines, TRACE_METRICS[0]) if lines else None
    dropped = metric_sum(lines, TRACE_METRICS[1]) if lines else None
    bench.tracing.update(
        sink=stats,
        sink_cpu_s=round(cpu_seconds(bench.sink.pid), 3),
        metrics=lines,
        spans_exported=exported,
        spans_dropped=dropped,
        requests_served=bench.served[side],
        rss_after_mb=round(mem["VmRSS"], 1),
        hwm_mb=round(mem["VmHWM"], 1),
    )
    if not lines:
        bench.notes.append(f"the proxy+tracing's /metrics has no {' or '.join(TRACE_METRICS)} line")
    if dropped:
        bench.notes.append(f"the proxy+tracing dropped {dropped:,.0f} spans (see its /metrics lines above and "
                          "its log): the tracing figures do not include exporting them")
    if stats.get("not_protobuf") or stats.get("bad") or stats.get("other"):
        bench.notes.append(f"the OTLP sink saw odd requests: {stats.get('not_protobuf')} without "
                          f"application/x-protobuf, {stats.get('bad')} unparsable, {stats.get('other')} "
                          "to other paths")
