"""`/metrics` of a proxy run with `--workers N`: any worker's scrape covers the whole proxy.

Prometheus scrapes one address per pod or machine, and with SO_REUSEPORT the kernel picks which worker answers,
so a worker's own counters alone would be a random N-th of the truth. Each worker therefore also serves its own
exposition on a Unix socket in the supervisor's private run directory (`worker-I.sock`, mode 0700 directory;
the protocol is "connect, read to EOF"), and the worker that gets the scrape reads every other worker's there
and merges: counters and histograms (buckets, sums, counts) are summed series by series; gauges, which do not
add up (an observed p90 latency), keep one series per worker with a `worker` label (bounded by the worker
count, never client input). `groq_proxy_workers` is the configured count and `groq_proxy_workers_scraped` how
many answered this scrape, so a scrape that missed a worker is visible. Nothing of this is on the request path:
the cost is one local connection per other worker per scrape.

A worker that is restarted starts its counters from zero, so the summed counter drops by what that worker had
counted; Prometheus's `rate()` and `increase()` read a drop as a counter reset (as for a restarted pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from aiohttp import web

PEER_TIMEOUT_S = 2.0


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


class Family:
    __slots__ = ("help", "type", "samples")

    def __init__(self) -> None:
        self.help: str | None = None
        self.type: str | None = None
        self.samples: dict[str, float] = {}


def merge(expositions: dict[int, str]) -> bytes:
    """Prometheus text expositions by worker index, as one: counters and histograms summed, gauges per worker."""
    families: dict[str, Family] = {}
    for worker, text in sorted(expositions.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                _, kind, name, *rest = line.split(" ", 3)
                family = families.setdefault(name, Family())
                if kind == "HELP":
                    family.help = line
                else:
                    family.type = rest[0] if rest else "untyped"
                continue
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if family is None:  # a sample before any TYPE line: its own untyped family
                family = families.setdefault(series.partition("{")[0], Family())
            if family.type == "gauge":
                series = (series[:-1] + f',worker="{worker}"}}') if series.endswith("}") else \
                    f'{series}{{worker="{worker}"}}'
            family.samples[series] = family.samples.get(series, 0.0) + float(value)
    out = []
    for name, family in families.items():
        if family.help:
            out.append(family.help + "\n")
        if family.type:
            out.append(f"# TYPE {name} {family.type}\n")
        out.extend(f"{series} {_num(value)}\n" for series, value in family.samples.items())
    return "".join(out).encode()


def _num(value: float) -> str:
    return str(int(value)) if value == value and abs(value) != float("inf") and value.is_integer() else repr(value)


class WorkerMetrics:
    """This worker's place among its siblings: serves its own exposition to them, merges theirs into a scrape."""

    def __init__(self, directory: str, index: int, workers: int) -> None:
        self.directory, self.index, self.workers = directory, index, workers

    def serve_ctx(self, render):
        """An aiohttp cleanup_ctx: the Unix socket on which siblings read `render()` for the app's lifetime."""

        async def ctx(app: web.Application):
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    writer.write(render(app))
                    await writer.drain()
                except ConnectionError:
                    pass
                finally:
                    writer.close()

            path = socket_path(self.directory, self.index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by this worker's predecessor, if it died
            server = await asyncio.start_unix_server(answer, path)
            yield
            server.close()
            await server.wait_closed()

        return ctx

    async def merged(self, own: bytes) -> bytes:
        """The whole proxy's exposition: this worker's own and every sibling's that answers in time."""
        others = [i for i in range(self.workers) if i != self.index]
        answers = await asyncio.gather(*(self._read(i) for i in others))
        expositions = {self.index: own.decode()}
        expositions.update((i, text) for i, text in zip(others, answers) if text is not None)
        scraped = len(expositions)
        body = merge(expositions)
        return body + (
            "# HELP groq_proxy_workers Worker processes configured (server.workers).\n"
            f"# TYPE groq_proxy_workers gauge\ngroq_proxy_workers {self.workers}\n"
            "# HELP groq_proxy_workers_scraped Workers whose metrics are in this scrape.\n"
            f"# TYPE groq_proxy_workers_scraped gauge\ngroq_proxy_workers_scraped {scraped}\n").encode()

    async def _read(self, index: int) -> str | None:
        try:
            async with asyncio.timeout(PEER_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(socket_path(self.directory, index))
                try:
                    return (await reader.read()).decode()
                finally:
                    writer.close()
        except (OSError, TimeoutError):  # being restarted, or stuck: the scrape goes on without it
            return None


WORKER_METRICS = web.AppKey("worker_metrics", WorkerMetrics)
