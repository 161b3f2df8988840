"""benchmarkLatency / benchmarkInference from the design: timed streamed runs of one model through the proxy.

Each run is a real streamed request to the proxy, so it measures what a client sees: whole latency, time to
the first token, generation speed, which real model answered, and the latency category of the tier.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import aiohttp
import orjson

from proxy.app.errors import bad_request
from proxy.routing.latency import Thresholds


@dataclass(frozen=True)
class BenchRequest:
    model: str
    prompt: str
    runs: int = 5
    max_tokens: int = 100
    temperature: float | None = None

    @classmethod
    def from_body(cls, body: dict) -> "BenchRequest":
        """Validates an /admin/benchmark body with the same field names as the command's flags."""
        model, prompt = body.get("model"), body.get("prompt")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required: a virtual or real model name.", param="model")
        if not isinstance(prompt, str) or not prompt:
            raise bad_request("'prompt' is required: a non-empty string.", param="prompt")
        runs, max_tokens = body.get("runs", 5), body.get("max_tokens", 100)
        if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= 100:
            raise bad_request("'runs' must be an integer from 1 to 100.", param="runs")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 32768:
            raise bad_request("'max_tokens' must be an integer from 1 to 32768.", param="max_tokens")
        temperature = body.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not 0 <= temperature <= 2):
            raise bad_request("'temperature' must be a number from 0 to 2.", param="temperature")
        return cls(model, prompt, runs, max_tokens, None if temperature is None else float(temperature))


@dataclass
class RunResult:
    run: int
    ok: bool
    latency_ms: float
    ttft_ms: float | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None
    model: str | None = None
    category: str | None = None
    error: str | None = None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 2)


async def _one_run(session: aiohttp.ClientSession, url: str, req: BenchRequest, n: int, headers: dict,
                   thresholds: Thresholds) -> RunResult:
    body = {
        "model": req.model,
        "messages": [{"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if req.temperature is not None:
        body["temperature"] = req.temperature
    start = time.perf_counter()
    first = None
    usage = None
    error = None
    buffer = b""
    async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json", **headers}) as resp:
        model = resp.headers.get("x-groq-proxy-model")
        if resp.status != 200:
            text = await resp.text()
            return RunResult(n, False, round((time.perf_counter() - start) * 1000, 2), model=model,
                             error=f"{resp.status}: {text[:300]}")
        async for chunk in resp.content.iter_any():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data:"):
                    continue
                data = event[5:].strip()
                if data == b"[DONE]":
                    continue
                obj = orjson.loads(data)
                if "error" in obj:
                    error = str(obj["error"].get("message", obj["error"]))[:300]
                    continue
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("reasoning")):
                        first = time.perf_counter()
                usage = obj.get("usage") or (obj.get("x_groq") or {}).get("usage") or usage
    end = time.perf_counter()
    latency_ms = (end - start) * 1000
    ttft_ms = (first - start) * 1000 if first else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    speed = None
    if tokens:
        generating = end - first if first and end > first else end - start
        speed = round(tokens / generating, 1) if generating > 0 else None
    category = thresholds.category(ttft_ms if ttft_ms is not None else latency_ms)
    return RunResult(n, error is None, round(latency_ms, 2), None if ttft_ms is None else round(ttft_ms, 2),
                     tokens, speed, model, category, error)


async def run_benchmark(base_url: str, req: BenchRequest, thresholds: Thresholds, *, headers: dict | None = None,
                        progress: Callable[[RunResult], None] | None = None) -> dict:
    """Runs `req.runs` streamed requests one after the other; returns per-run results and the summary."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    results: list[RunResult] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for n in range(1, req.runs + 1):
            try:
                result = await _one_run(session, url, req, n, headers or {}, thresholds)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                result = RunResult(n, False, 0.0, error=f"{type(exc).__name__}: {exc}"[:300])
            results.append(result)
            if progress is not None:
                progress(result)
    ok = [r for r in results if r.ok]
    latencies = [r.latency_ms for r in ok]
    ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    speeds = [r.tokens_per_s for r in ok if r.tokens_per_s]
    models: dict[str, int] = {}
    for r in ok:
        models[r.model or "?"] = models.get(r.model or "?", 0) + 1
    ttft_p95 = _percentile(ttfts, 0.95)
    summary = {
        "model": req.model,
        "runs": req.runs,
        "succeeded": len(ok),
        "latency_ms": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
        "ttft_ms": {"p50": _percentile(ttfts, 0.5), "p95": ttft_p95},
        "tokens_per_s": {"mean": round(sum(speeds) / len(speeds), 1) if speeds else None,
                         "p50": _percentile(speeds, 0.5)},
        "answered_by": models,
        # The tier's category of the p95 time to first token: what a user of this tier waits for.
        "category": thresholds.category(ttft_p95) if ttft_p95 is not None else None,
    }
    return {"summary": summary, "runs": [asdict(r) for r in results]}


def render(report: dict) -> str:
    s = report["summary"]
    lines = [f"{'run':>4} {'latency ms':>11} {'ttft ms':>9} {'tok/s':>8}  {'category':<11} model"]
    for r in report["runs"]:
        if r["ok"]:
            lines.append(f"{r['run']:>4} {r['latency_ms']:>11.1f} {r['ttft_ms'] or 0:>9.1f} "
                         f"{r['tokens_per_s'] or 0:>8.1f}  {r['category'] or '-':<11} {r['model']}")
        else:
            lines.append(f"{r['run']:>4} failed: {r['error']}")
    lines.append(
        f"overall {s['model']}: {s['succeeded']}/{s['runs']} ok; latency p50 {s['latency_ms']['p50']} ms, "
        f"p95 {s['latency_ms']['p95']} ms; ttft p50 {s['ttft_ms']['p50']} ms, p95 {s['ttft_ms']['p95']} ms; "
        f"{s['tokens_per_s']['mean']} tok/s; category {s['category']}; answered by {s['answered_by']}"
    )
    return "\n".join(lines)
