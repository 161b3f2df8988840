"""The benchmark's command line and its table, without wrk: `python -m bench.run` keeps its options and
defaults, refuses bad ones naming the option, and renders measured runs into the table the README explains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.load import Run
from bench.report import json_report, render
from bench.run import parse_args

OPTIONS = ("--duration", "--warmup", "--quick", "--connections", "--modes", "--threads", "--mem-requests",
           "--log-level", "--baseline", "--tracing", "--upstream-chunked", "--pin", "--repeat", "--quiet-wait",
           "--remeasure", "--json", "--workers")
META = {"date": "2026-11-30 05:00 UTC", "commit": "abc1234", "cpus": 2, "cpu_model": "test cpu",
        "loadavg_before": "0.00 0.00 0.00"}


def test_help_lists_every_option():
    done = subprocess.run([sys.executable, "-m", "bench.run", "--help"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m bench.run")
    for option in OPTIONS:
        assert option in done.stdout


def test_defaults_and_the_ones_repeat_and_quick_change():
    one = parse_args([])
    assert (one.duration, one.warmup, one.connections, one.modes) == (10.0, 2.0, [1, 16], ["non-stream", "stream"])
    assert (one.repeat, one.quiet_wait, one.remeasure, one.mem_requests) == (1, 30.0, 1, 100_000)
    repeated = parse_args(["--repeat", "5", "--quick"])
    assert (repeated.duration, repeated.warmup, repeated.quiet_wait, repeated.remeasure) == (3.0, 1.0, 5.0, 0)
    explicit = parse_args(["--repeat", "5", "--quiet-wait", "30", "--remeasure", "1"])
    assert (explicit.quiet_wait, explicit.remeasure) == (30.0, 1)


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat: at least 1"),
    (["--connections", "1,x"], "--connections: comma-separated integers"),
    (["--connections", "0"], "--connections: at least one count"),
    (["--modes", "both"], "--modes: non-stream, stream or both"),
    (["--workers", "1"], "--workers: 2 or more"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def run(side: str, rps: float, p50: float, p99: float, cpu: float, round_: int = 1) -> Run:
    return Run(mode="non-stream", connections=16, side=side, round=round_, rps=rps, p50_ms=p50, p99_ms=p99,
               cpu_us_per_request=cpu, requests=int(rps), seconds=1.0)


def test_the_table_of_one_cell():
    args = parse_args(["--modes", "non-stream", "--connections", "16", "--mem-requests", "0"])
    bench = SimpleNamespace(args=args, memory={}, tracing={}, notes=[],
                            runs=[run("direct", 40_000, 0.2, 1.0, 10), run("proxy", 5_000, 3.0, 6.0, 200)])
    lines = render(bench, META).splitlines()
    assert lines[0] == "groq-proxy bench  2026-11-30 05:00 UTC  commit abc1234"
    cell = lines.index("non-stream, 16 conn")
    assert lines[cell + 1:cell + 5] == [
        "  direct                      40,000     0.200     1.000          10    0.00",
        "  proxy                        5,000     3.000     6.000         200    0.00",
        "  proxy / direct               0.12x    15.00x     6.00x",
        "  added by the proxy                    +2.800    +5.000",
    ]
    assert "  non-stream req/s at 16 conn                5,000 req/s   >= 7,000 req/s  MISSED" in lines
    report = json_report(bench, META)
    assert [m["side"] for m in report["medians"]] == ["direct", "proxy"]
    assert report["targets"][0] == {"target": "non-stream req/s at 16 conn", "value": 5000.0, "limit": 7000.0,
                                    "unit": "req/s", "higher_is_better": True, "met": False}


def test_the_table_with_rounds_shows_medians_and_each_rounds_tracing_loss():
    args = parse_args(["--modes", "non-stream", "--connections", "16", "--repeat", "3", "--tracing"])
    runs = []
    for r, (plain, traced) in enumerate([(5_000, 4_000), (4_000, 3_600), (6_000, 4_500)], start=1):
        runs += [run("proxy", plain, 3.0, 6.0, 200, r), run("proxy+tracing", traced, 4.0, 8.0, 250, r)]
    bench = SimpleNamespace(args=args, memory={}, tracing={}, notes=[], runs=runs)
    lines = render(bench, META).splitlines()
    assert "  proxy                        5,000     3.000     6.000         200    0.00   4,000-6,000 (40%)" in lines
    assert "    by round, req/s lost  20.0% 10.0% 25.0%   (median 20.0%, range 10.0 to 25.0)" in lines
    assert any(ln.startswith("  lost to tracing              20.0%") for ln in lines)


def test_the_table_with_workers_shows_their_ratio_to_one_worker_and_the_target():
    args = parse_args(["--modes", "non-stream", "--connections", "16", "--mem-requests", "0", "--workers", "2"])
    assert args.workers == 2
    bench = SimpleNamespace(args=args, memory={}, tracing={}, notes=[],
                            runs=[run("direct", 40_000, 0.2, 1.0, 10), run("proxy", 5_000, 3.0, 6.0, 200),
                                  run("proxy-2w", 7_500, 2.0, 5.0, 210)])
    lines = render(bench, META).splitlines()
    cell = lines.index("non-stream, 16 conn")
    assert lines[cell + 3] == "  proxy-2w                     7,500     2.000     5.000         210    0.00"
    assert "  2 workers / 1 worker         1.50x     0.67x     0.83x       1.05x" in lines
    assert "  non-stream req/s 2 workers / 1, 16 conn          1.50x   >= 1.4 x        met" in lines
    row = next(r for r in json_report(bench, META)["targets"] if r["unit"] == "x")
    assert row == {"target": "non-stream req/s 2 workers / 1, 16 conn", "value": 1.5, "limit": 1.4, "unit": "x",
                   "higher_is_better": True, "met": True}
