"""Requests through reloads under load (issue 11, item 10): the proxy under wrk's mixed load (plain and streamed
requests in turn), sent SIGHUP every `--every` seconds, each a whole reload (config read, checked, a new
generation built and swapped in). Printed: requests, errors (wrk's connect, read, write, timeout and non-2xx
counts: the target is 0), reloads the proxy logged, and req/s beside a run of the same load without reloads.

    python -m bench.reload_load --duration 10 --every 0.25
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from bench.load import Wrk, measure
from bench.sides import HOST, PROXY_PATH, check_answers, start_proxy, start_upstream


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=0.25, help="seconds between two SIGHUPs")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reload-load-") as tmp:
        workdir = Path(tmp)
        upstream, upstream_port = start_upstream(workdir, False, None)
        proxy, port = None, 0
        try:
            proxy, port = start_proxy(workdir, upstream_port, "info", None)
            check_answers(port, PROXY_PATH, via_proxy=True)
            wrk = Wrk(workdir, 1, None)
            url = f"http://{HOST}:{port}{PROXY_PATH}"
            watched = {"proxy": proxy.pid, "upstream": upstream.pid}
            measure(wrk, url, "mixed", args.connections, 1, "proxy", watched)  # warm-up
            still = measure(wrk, url, "mixed", args.connections, args.duration, "proxy", watched)
            stop, sent = threading.Event(), [0]

            def hup() -> None:
                while not stop.wait(args.every):
                    proxy.proc.send_signal(signal.SIGHUP)
                    sent[0] += 1

            sender = threading.Thread(target=hup, daemon=True)
            sender.start()
            try:
                run = measure(wrk, url, "mixed", args.connections, args.duration, "proxy", watched)
            finally:
                stop.set()
                sender.join()
            reloaded = proxy.log.read_text(errors="replace").count('"event":"config_reloaded"')
            print(f"{'':<16}{'requests':>9}  {'req/s':>8}  {'errors':>6}  {'reloads':>7}")
            print(f"{'no reload':<16}{still.requests:>9,}  {still.rps:>8,.0f}  {still.errors:>6}  {0:>7}")
            print(f"{'SIGHUP':<16}{run.requests:>9,}  {run.rps:>8,.0f}  {run.errors:>6}  {reloaded:>7}"
                  f"  (of {sent[0]} sent)")
            return 0 if run.errors == 0 and reloaded > 0 else 1
        finally:
            if proxy is not None:
                proxy.stop()
            upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
