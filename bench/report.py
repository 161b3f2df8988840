"""The report: the table (a row per side, the ratios and the latency each side adds, per mode and connection
count), the OTLP sink's and the proxies' memory lines, the targets with met or MISSED, the peers and the notes;
and the same numbers as JSON for --json. See "How to read the table" in bench/README.md."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING

from bench.procfs import NOISY_CORES
from bench.sides import CACHE_SIDES
from bench.stats import Median, find_run, loss_pct, medians, noise, tracing_by_round
from bench.targets import target_rows
from bench.tracing import SPANS_PER_REQUEST

if TYPE_CHECKING:
    from bench.session import Bench

PEERS = (
    "peers measured on the same kind of 2-core box (shared/reference/peers.md): thinnest aiohttp+uvloop\n"
    "pass-through ~10,000 req/s at 16 conn, +0.17 ms at 1 conn, 40 MB; LiteLLM 1.108.7 (1 worker)\n"
    "175 / 102 req/s (non-stream / stream), +5.8 / +9.6 ms, 480 MB"
)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"



def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")



def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "ms":
        return f"{value:+.3f} ms"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.1f} {unit}"


def spread(m: Median) -> str:
    """The range of req/s over the rounds, and its width as a share of the median."""
    width = (m.rps_max - m.rps_min) / m.rps * 100.0 if m.rps else 0.0
    return f"{m.rps_min:,.0f}-{m.rps_max:,.0f} ({width:.0f}%)"


def render(bench: Bench, meta: dict) -> str:
    args, memory = bench.args, bench.memory
    runs = medians(bench.runs)  # with --repeat 1, each Median is just the one run
    repeated = args.repeat > 1
    out = [
        f"groq-proxy bench  {meta['date']}  commit {meta['commit']}",
        f"{meta['cpus']} cores ({meta['cpu_model']}), load before {meta['loadavg_before']}; "
        f"wrk -t{args.threads}, {args.duration:g} s runs after {args.warmup:g} s warm-up; "
        f"proxy log_level={args.log_level}; "
        f"{'pinned: proxies (and pass-through) cpu1, upstream+wrk (and OTLP sink) cpu0' if args.pin else 'not pinned'}; "
        f"upstream {'chunked' if args.upstream_chunked else 'Content-Length'}"
        + ("; proxy+tracing: sample_ratio 1.0, OTLP/HTTP to a local sink, metrics on" if args.tracing else ""),
    ]
    if repeated:
        out.append(
            f"{args.repeat} interleaved rounds per cell, the sides' order rotated each round; every figure below "
            f"is the median over the rounds, ratios and targets are computed from the medians; quiet-wait "
            f"{args.quiet_wait:g} s, remeasure {args.remeasure}"
        )
    out += [
        "",
        f"{'':<26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}{'others':>8}"
        + ("   req/s min-max (width)" if repeated else ""),
    ]
    for mode in args.modes:
        for connections in args.connections:
            direct, proxy = find_run(runs, mode, connections, "direct"), find_run(runs, mode, connections, "proxy")
            thin = find_run(runs, mode, connections, "pass-through")
            traced = find_run(runs, mode, connections, "proxy+tracing")
            multi = find_run(runs, mode, connections, f"proxy-{args.workers}w") if args.workers else None
            cached = [r for r in (find_run(runs, mode, connections, s) for s in CACHE_SIDES) if r is not None]
            if not (direct or thin or proxy or traced):
                continue
            out.append(f"{mode}, {connections} conn")
            for run in (direct, thin, proxy, multi, traced, *cached):
                if run is None:
                    continue
                cpu = f"{run.cpu_us_per_request:.0f}"
                err = f"  ({run.errors} errors)" if run.errors else ""
                out.append(f"  {run.side:<24}{run.rps:>10,.0f}{run.p50_ms:>10.3f}{run.p99_ms:>10.3f}{cpu:>12}"
                           f"{noise(run):>8.2f}" + (f"   {spread(run)}" if repeated else "") + err)
            if direct and proxy:
                out.append(f"  {'proxy / direct':<24}{ratio(proxy.rps, direct.rps):>10}"
                           f"{ratio(proxy.p50_ms, direct.p50_ms):>10}{ratio(proxy.p99_ms, direct.p99_ms):>10}")
                out.append(f"  {'added by the proxy':<24}{'':>10}{proxy.p50_ms - direct.p50_ms:>+10.3f}"
                           f"{proxy.p99_ms - direct.p99_ms:>+10.3f}")
            if multi and proxy:
                out.append(f"  {f'{args.workers} workers / 1 worker':<24}{ratio(multi.rps, proxy.rps):>10}"
                           f"{ratio(multi.p50_ms, proxy.p50_ms):>10}{ratio(multi.p99_ms, proxy.p99_ms):>10}"
                           f"{ratio(multi.cpu_us_per_request, proxy.cpu_us_per_request):>12}")
            if thin and direct:
                out.append(f"  {'added by pass-through':<24}{'':>10}{thin.p50_ms - direct.p50_ms:>+10.3f}"
                           f"{thin.p99_ms - direct.p99_ms:>+10.3f}")
            if thin and proxy:
                out.append(f"  {'proxy / pass-through':<24}{ratio(proxy.rps, thin.rps):>10}"
                           f"{ratio(proxy.p50_ms, thin.p50_ms):>10}{ratio(proxy.p99_ms, thin.p99_ms):>10}"
                           f"{ratio(proxy.cpu_us_per_request, thin.cpu_us_per_request):>12}")
            if traced and proxy:
                out.append(f"  {'tracing / proxy':<24}{ratio(traced.rps, proxy.rps):>10}"
                           f"{ratio(traced.p50_ms, proxy.p50_ms):>10}{ratio(traced.p99_ms, proxy.p99_ms):>10}"
                           f"{ratio(traced.cpu_us_per_request, proxy.cpu_us_per_request):>12}")
            if traced and thin:
                out.append(f"  {'tracing / pass-through':<24}{ratio(traced.rps, thin.rps):>10}"
                           f"{ratio(traced.p50_ms, thin.p50_ms):>10}{ratio(traced.p99_ms, thin.p99_ms):>10}"
                           f"{ratio(traced.cpu_us_per_request, thin.cpu_us_per_request):>12}")
            if traced and proxy and proxy.rps and proxy.cpu_us_per_request:
                cpu = (traced.cpu_us_per_request / proxy.cpu_us_per_request - 1.0) * 100.0
                out.append(f"  {'lost to tracing':<24}{loss_pct(traced, proxy):>9.1f}%{'':>20}{cpu:>+11.1f}%"
                           "   (req/s lost; CPU us/req added" + ("; from the medians)" if repeated else ")"))
                rounds = tracing_by_round(bench.runs, mode, connections)
                if repeated and rounds:
                    lost = [r["lost_pct"] for r in rounds if r["lost_pct"] is not None]
                    added = [r["cpu_added_pct"] for r in rounds if r["cpu_added_pct"] is not None]
                    out.append(f"    {'by round, req/s lost':<22}" + " ".join(f"{x:.1f}%" for x in lost)
                               + (f"   (median {statistics.median(lost):.1f}%, range {min(lost):.1f} to "
                                  f"{max(lost):.1f})" if lost else ""))
                    out.append(f"    {'by round, CPU added':<22}" + " ".join(f"{x:+.1f}%" for x in added)
                               + (f"   (median {statistics.median(added):+.1f}%)" if added else ""))
            for hits in cached:  # the cache sides: hits, against the pass-through and the direct call
                if thin:
                    out.append(f"  {hits.side + ' / pass-through':<24}{ratio(hits.rps, thin.rps):>10}"
                               f"{ratio(hits.p50_ms, thin.p50_ms):>10}{ratio(hits.p99_ms, thin.p99_ms):>10}"
                               f"{ratio(hits.cpu_us_per_request, thin.cpu_us_per_request):>12}")
                if direct:
                    out.append(f"  {'added by ' + hits.side:<24}{ratio(hits.rps, direct.rps):>10}"
                               f"{hits.p50_ms - direct.p50_ms:>+10.3f}{hits.p99_ms - direct.p99_ms:>+10.3f}"
                               "   (req/s as a ratio of direct; p50, p99 added)")
    if memory.get("rss_after_mb") is not None:
        out += [
            "",
            f"proxy memory: RSS {memory['rss_start_mb']:.1f} MB at start, {memory['rss_before_phase_mb']:.1f} MB after "
            f"{memory['requests_before_phase']:,} requests, {memory['rss_after_mb']:.1f} MB after "
            f"{memory['total_requests']:,} (peak {memory['hwm_mb']:.1f} MB)",
        ]
    out += tracing_lines(bench)
    out += ["", "targets (2 cores shared by wrk, upstream and proxy"
            + (f"; medians of {args.repeat} rounds)" if repeated else ")")]
    for row in target_rows(runs, memory, args.workers):
        sign = ">=" if row["higher_is_better"] else "<="
        limit = f"{row['limit']:,.0f} req/s" if row["unit"] == "req/s" else f"{row['limit']:g} {row['unit']}"
        out.append(f"  {row['target']:<40}{fmt_value(row['value'], row['unit']):>14}   {sign} {limit:<12} "
                   f"{verdict(row['met'])}")
    out += ["", PEERS]
    notes = bench.notes  # what render adds here goes into --json too
    busy = [r for r in bench.runs if noise(r) > NOISY_CORES]
    if busy:
        notes.append(
            f"other processes or the hypervisor took > {NOISY_CORES} core during "
            + ", ".join(f"{r.mode}/{r.connections}/{r.side}" + (f"/round {r.round}" if repeated else "")
                        for r in busy)
            + (": those figures are noisy" if not repeated else
               ": those rounds are noisy (a median over the rounds outvotes a minority of them)")
        )
    if any(r.errors for r in bench.runs) or memory.get("phase_errors"):
        notes.append("some requests failed (see the errors above): the figures for those runs are suspect")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def tracing_lines(bench: Bench) -> list[str]:
    """What the sink received and what the tracing proxy's exporter says it sent and lost."""
    t = bench.tracing
    if not t.get("sink"):
        return []
    sink, served, exported = t["sink"], t["requests_served"], t.get("spans_exported")
    span_text = ""
    if exported:
        span_text = (f"; the proxy+tracing's exporter: {exported:,.0f} spans sent for {served:,} requests served "
                     f"({exported / served:.2f} per request, {SPANS_PER_REQUEST} expected), "
                     f"{sink['bytes'] / exported:,.0f} bytes per span" if served else "")
    seconds = sink["last"] - sink["first"]
    out = [
        "",
        f"OTLP sink: {sink['requests']:,} export requests, {sink['bytes']:,} bytes "
        f"({sink['bytes'] / max(sink['requests'], 1) / 1024:,.1f} KB each, largest {sink['max_body'] / 1024:,.1f} KB, "
        f"{sink['connections']} connection(s)) over {seconds:,.0f} s; sink CPU {t['sink_cpu_s']:.2f} s in all"
        + span_text,
        "proxy+tracing /metrics at the end:",
        *(f"  {ln}" for ln in t.get("metrics") or ["(no trace exporter lines)"]),
        f"proxy+tracing memory: RSS {t['rss_start_mb']:.1f} MB at start, {t['rss_after_mb']:.1f} MB after "
        f"{served:,} requests (peak {t['hwm_mb']:.1f} MB)",
    ]
    return out


def json_report(bench: Bench, meta: dict) -> dict:
    """Every number, for --json: call it after `render`, whose notes it includes."""
    args = bench.args
    return {
        "meta": meta,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "runs": [asdict(r) for r in bench.runs],  # every round's run, with its "round"
        "medians": [asdict(m) for m in medians(bench.runs)],  # what the table shows
        "tracing_by_round": [row for mode in args.modes for c in args.connections
                             for row in tracing_by_round(bench.runs, mode, c)],
        "memory": bench.memory,
        "tracing": bench.tracing,
        "targets": target_rows(medians(bench.runs), bench.memory, bench.args.workers),
        "notes": bench.notes,
    }
