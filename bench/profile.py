"""Where the proxy spends its time under the bench's load: py-spy samples the proxy while wrk drives it.

    .venv/bin/pip install py-spy                          # once; py-spy is not a dependency of the proxy
    python -m bench.profile                               # non-stream, 16 connections, 10 s
    python -m bench.profile --mode stream --top 40 --svg /tmp/stream.svg
    python -m bench.profile --tracing                     # the proxy that traces every request

Prints the hottest lines by own time (the line the sample was executing) and the hottest functions by total
time (anywhere on the stack), with file:line; `--svg` also writes a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.errors import BenchError
from bench.load import Wrk
from bench.sides import DIRECT_PATH, HOST, PROXY_PATH, check_answers, start_proxy, start_sink, start_upstream

SITE = "site-packages/"


def short(frame: str) -> str:
    """`func (path/to/file.py:12)` with the path cut to the package."""
    func, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    if SITE in where:
        where = where.split(SITE, 1)[1]
    elif "/lib/python" in where:
        where = "stdlib/" + where.split("/lib/python", 1)[1].split("/", 1)[1]
    else:
        for root in ("/proxy/", "/policies/", "/bench/"):
            if root in where:
                where = root.strip("/") + "/" + where.split(root, 1)[1]
                break
    return f"{func} ({where})"


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return "no samples"
    by_package: collections.Counter[str] = collections.Counter()
    for frame, n in own.items():
        where = frame.rpartition(" (")[2]
        by_package[where.split("/", 1)[0] if "/" in where else where.split(":", 1)[0]] += n
    roots: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            roots[short(stack.split(";")[0])] += int(count)
    out = [f"{samples} samples", "", "own time by package"]
    out += [f"  {100 * n / samples:5.1f}%  {p}" for p, n in by_package.most_common(12)]
    out += ["", "outermost frames (the event loop, other threads)"]
    out += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in roots.most_common(5)]
    out += ["", f"own time (top {top})"]
    out += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", f"total time, proxy and aiohttp frames below the event loop (top {top})"]
    shown = [(f, n) for f, n in total.most_common()
             if ("(proxy/" in f or "(policies/" in f or "(aiohttp/" in f)
             and "(proxy/app/cli.py" not in f and "run_app (aiohttp/web.py" not in f]
    out += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in shown[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("non-stream", "stream", "mixed"), default="non-stream")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=int, default=10, help="seconds sampled (default 10)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--upstream-chunked", action="store_true", help="streams framed chunked, as Groq does")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--tracing", action="store_true",
                        help="profile the proxy with tracing on (every request sampled, exported to a local sink)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--svg", metavar="PATH", help="also write a flame graph")
    parser.add_argument("--raw", metavar="PATH", help="also keep the collapsed stacks (one stack and count a line)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="groq-proxy-profile-") as tmp:
        workdir = Path(tmp)
        upstream = proxy = sink = None
        try:
            upstream, upstream_port = start_upstream(workdir, args.upstream_chunked, None)
            if args.tracing:
                sink, sink_port = start_sink(workdir, None)
                proxy, proxy_port = start_proxy(workdir, upstream_port, args.log_level, None, "proxy+tracing", sink_port)
            else:
                proxy, proxy_port = start_proxy(workdir, upstream_port, args.log_level, None)
            check_answers(upstream_port, DIRECT_PATH, via_proxy=False)
            check_answers(proxy_port, PROXY_PATH, via_proxy=True)
            wrk = Wrk(workdir, 1, None)
            url = f"http://{HOST}:{proxy_port}{PROXY_PATH}"
            wrk.run(url, args.mode, args.connections, 2)  # warm-up
            result: dict = {}
            seconds = args.duration * (2 if args.svg else 1) + 2
            load = threading.Thread(target=lambda: result.update(wrk.run(url, args.mode, args.connections, seconds)))
            load.start()
            collapsed = workdir / "profile.txt"
            record = [py_spy, "record", "--pid", str(proxy.pid), "--rate", str(args.rate),
                      "--duration", str(args.duration), "--nonblocking", "--full-filenames"]
            if args.native:
                record.append("--native")
            subprocess.run([*record, "--format", "raw", "--output", str(collapsed)], check=True,
                           capture_output=True, text=True)
            if args.svg:
                subprocess.run([*record, "--format", "flamegraph", "--output", args.svg], check=True,
                               capture_output=True, text=True)
            load.join()
            rps = result["requests"] / (result["duration_us"] / 1e6) if result else 0.0
            print(f"proxy under wrk: {args.mode}, {args.connections} conn, {rps:,.0f} req/s while sampled "
                  f"(sampling slows the proxy down)\n")
            print(summarize(collapsed, args.top))
            if args.raw:
                shutil.copyfile(collapsed, args.raw)
        except (BenchError, subprocess.CalledProcessError) as exc:
            print(f"bench.profile: {exc}", file=sys.stderr)
            return 1
        finally:
            for proc in (proxy, upstream, sink):
                if proc is not None:
                    proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
