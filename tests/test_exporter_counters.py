"""The trace exporter's own health on /metrics: `groq_proxy_trace_spans_exported_total` counts the spans the
collector accepted, `groq_proxy_trace_spans_dropped_total{reason}` the spans lost to a collector that refuses
them or is down (`export_failed`) and to a full queue (`queue_full`). An operator alerts on these, so each must
move with what really happened, span for span. The collector is the real receiver (tests/otlp_receiver.py).
"""

from __future__ import annotations

import asyncio
import time

from proxy.app.server import STATE, build_app
from proxy.sim.testing import status
from tests.conftest import closed_port_url
from tests.otlp_receiver import otlp  # noqa: F401  (a fixture)
from tests.test_metrics import Scrape, scrape
from tests.test_tracing import call, chat, traced_config

EXPORTED = "groq_proxy_trace_spans_exported_total"
DROPPED = "groq_proxy_trace_spans_dropped_total"


def counters(s: Scrape) -> tuple[float, float, float]:
    """(exported, dropped export_failed, dropped queue_full)."""
    return s.value(EXPORTED), s.value(DROPPED, reason="export_failed"), s.value(DROPPED, reason="queue_full")


async def scrape_until(base: str, predicate, timeout: float = 10.0) -> Scrape:
    """Scrapes /metrics until `predicate(scrape)` holds: the exporter runs on its own clock."""
    deadline = time.monotonic() + timeout
    while True:
        s = await scrape(base)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed the expected counters: {counters(s)}")
        await asyncio.sleep(0.02)


async def test_a_fresh_traced_proxy_shows_every_exporter_counter_at_zero(upstream, otlp, start_proxy):
    scripted, url = upstream
    s = await scrape(await start_proxy(traced_config(url, otlp.url)))
    assert s.types[EXPORTED] == "counter" and s.types[DROPPED] == "counter"
    assert s.samples[EXPORTED] == [({}, 0)]
    assert sorted(s.samples[DROPPED], key=str) == [({"reason": "export_failed"}, 0), ({"reason": "queue_full"}, 0)]


async def test_exported_counts_every_span_the_collector_accepted(upstream, otlp, start_proxy):
    scripted, url = upstream
    scripted.behaviours["m1"] = status(503)
    base = await start_proxy(traced_config(url, otlp.url))

    for stream in (False, True, False):  # each: a server span and two attempt spans
        code, headers, _ = await call(base, chat(stream=stream))
        assert code == 200
        await otlp.wait_for_request(headers["x-request-id"], attempts=2)

    s = await scrape_until(base, lambda s: s.value(EXPORTED) == 9)
    assert len(otlp.spans) == 9
    assert counters(s) == (9, 0, 0)


async def test_spans_a_collector_refuses_are_counted_as_export_failed(upstream, otlp, start_proxy):
    scripted, url = upstream
    otlp.fail_status = 503
    base = await start_proxy(traced_config(url, otlp.url))

    for _ in range(2):
        assert (await call(base, chat()))[0] == 200
    await otlp.wait_for(lambda r: len(r.rejected) == 4)

    s = await scrape_until(base, lambda s: s.value(DROPPED, reason="export_failed") == 4)
    assert counters(s) == (0, 4, 0)

    otlp.fail_status = None  # the collector is back: the counters go on from where they were
    _, headers, _ = await call(base, chat())
    await otlp.wait_for_request(headers["x-request-id"], attempts=1)
    s = await scrape_until(base, lambda s: s.value(EXPORTED) == 2)
    assert counters(s) == (2, 4, 0)


async def test_spans_sent_to_a_collector_that_is_down_are_counted_as_export_failed(upstream, aiohttp_server):
    scripted, url = upstream
    app = build_app(traced_config(url, closed_port_url().removesuffix("/openai/v1")))
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"

    for stream in (False, True):
        assert (await call(base, chat(stream=stream)))[0] == 200

    s = await scrape_until(base, lambda s: s.value(DROPPED, reason="export_failed") == 4)
    assert counters(s) == (0, 4, 0)
    assert app[STATE].exporter.failed == 4


async def test_spans_that_do_not_fit_the_queue_are_counted_as_queue_full(upstream, otlp, aiohttp_server):
    scripted, url = upstream
    otlp.hold = asyncio.Event()  # a collector that takes the first export and does not answer
    app = build_app(traced_config(url, otlp.url))
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    tracer = app[STATE].exporter.tracer
    # The queue holds 20,000 spans; a small one reaches "full" with a handful of requests, by the same rule.
    tracer.max_queue = 4

    _, first, _ = await call(base, chat())
    await otlp.wait_for(lambda r: r.held == 1)  # the exporter now waits on the collector and takes no more spans
    # A batch stays in the queue until the collector takes it (so a failed export can be retried): the
    # request's two spans are still queued, whether the held export carries one of them or both.
    assert len(tracer.queue) == 2
    for _ in range(5):  # ten more spans: the queue takes what fits in its four places, the rest are dropped
        assert (await call(base, chat()))[0] == 200

    s = await scrape(base)
    assert counters(s) == (0, 0, 10 - 2)
    assert len(tracer.queue) == 4

    otlp.hold.set()
    await otlp.wait_for(lambda r: len(r.spans) == 4)
    s = await scrape_until(base, lambda s: s.value(EXPORTED) == 4)
    assert counters(s) == (4, 0, 10 - 2)
    assert otlp.request_span(first["x-request-id"]) is not None  # the held export was delivered in the end


async def test_without_tracing_the_exporter_counters_are_not_served(upstream, start_proxy):
    scripted, url = upstream
    base = await start_proxy(traced_config(url, None))  # no endpoint, no OTEL_* variables: tracing off
    assert (await call(base, chat()))[0] == 200
    s = await scrape(base)
    assert EXPORTED not in s.types and DROPPED not in s.types
