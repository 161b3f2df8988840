"""Prometheus metrics, kept in plain dicts: an observation is a dict update, rendering happens on scrape.

Metric names (all prefixed groq_proxy_) are documented in the README; the alert rules and the Grafana
dashboard under deploy/ use them.
"""

from __future__ import annotations

from bisect import bisect_left

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.8, 1.0, 1.2, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple, float] = {}
        self._each: dict[tuple, int] = {}  # inc_each: a tuple of keys -> how many times each was counted

    def inc(self, key: tuple, amount: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def inc_each(self, keys: tuple[tuple, ...]) -> None:
        """`inc` of each key by one, kept as one count of the tuple until `values` is read through `fold` (the
        policy chain counts several decisions a request, the same ones for every request of a plan)."""
        self._each[keys] = self._each.get(keys, 0) + 1

    def fold(self) -> dict[tuple, float]:
        """`values`, with what `inc_each` counted added in."""
        if self._each:
            values = self.values
            for keys, n in self._each.items():
                for key in keys:
                    values[key] = values.get(key, 0) + n
            self._each.clear()
        return self.values

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} counter\n")
        for key, value in self.fold().items():
            out.append(f"{self.name}{_labels(self.labels, key)} {_num(value)}\n")


class Gauge:
    """A value that is set, not added to (a generation, a size)."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple, float] = {}

    def set(self, key: tuple, value: float) -> None:
        self.values[key] = value

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} gauge\n")
        for key, value in self.values.items():
            out.append(f"{self.name}{_labels(self.labels, key)} {_num(value)}\n")


class Histogram:
    def __init__(self, name: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...] = _SECONDS) -> None:
        self.name, self.help, self.labels, self.buckets = name, help, labels, buckets
        self.values: dict[tuple, list] = {}  # key -> [count per bucket..., count above the last, sum, count]

    def observe(self, key: tuple, value: float) -> None:
        row = self.values.get(key)
        if row is None:
            row = self.values[key] = [0] * (len(self.buckets) + 3)
        row[bisect_left(self.buckets, value)] += 1
        row[-2] += value
        row[-1] += 1

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} histogram\n")
        for key, row in self.values.items():
            cumulative = 0
            for bound, count in zip(self.buckets, row):
                cumulative += count
                out.append(f"{self.name}_bucket{_labels(self.labels + ('le',), key + (_num(bound),))} {cumulative}\n")
            out.append(f"{self.name}_bucket{_labels(self.labels + ('le',), key + ('+Inf',))} {row[-1]}\n")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(row[-2])}\n")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {row[-1]}\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


class ProxyMetrics:
    """The proxy's metric set. `virtual` is the requested virtual model (or the real model named directly)."""

    def __init__(self) -> None:
        p = "groq_proxy_"
        self.requests = Counter(p + "requests_total", "Requests answered, by virtual model, real model and status.",
                                ("virtual_model", "model", "status"))
        self.duration = Histogram(p + "request_duration_seconds", "Whole request time as the client sees it.",
                                  ("virtual_model", "model", "status"))
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request to the first data event.",
                              ("virtual_model", "model"))
        self.tokens = Counter(p + "tokens_total", "Tokens reported by the upstream, by type (input, output).",
                              ("virtual_model", "model", "type"))
        self.attempts = Counter(p + "attempts_total", "Upstream attempts by model and outcome.",
                                ("model", "outcome"))
        self.fallbacks = Counter(p + "fallbacks_total", "Attempts that fell over to the next model, by reason.",
                                 ("virtual_model", "model", "reason"))
        self.upstream = Histogram(p + "upstream_duration_seconds", "Time spent in upstream attempts of a request.",
                                  ("model",))
        self.overhead = Histogram(p + "overhead_seconds", "Request time minus upstream time: the proxy's own cost.",
                                  (), _OVERHEAD)
        self.category = Counter(p + "latency_category_total", "Requests by latency category of their tier.",
                                ("virtual_model", "category"))
        self.key_attempts = Counter(p + "key_attempts_total", "Upstream attempts by provider, pool key (its "
                                    "variable's name) and outcome.", ("provider", "key", "outcome"))
        self.usage_hist = Histogram("gen_ai_client_token_usage", "GenAI token usage per request (semconv).",
                                    ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"), _TOKENS)
        # Audio is not counted in tokens: its size and the time it took instead.
        self.audio_bytes = Counter(p + "audio_bytes_total", "Audio requests' bytes by operation (transcription, "
                                   "translation, speech) and direction (in: upload or text, out: transcript or "
                                   "audio).", ("operation", "virtual_model", "model", "direction"))
        self.audio_duration = Histogram(p + "audio_duration_seconds", "Whole time of an audio request, by "
                                        "operation.", ("operation", "virtual_model", "model"))
        self.all = (self.requests, self.duration, self.ttft, self.tokens, self.attempts, self.fallbacks,
                    self.upstream, self.overhead, self.category, self.usage_hist, self.key_attempts,
                    self.audio_bytes, self.audio_duration)

    def render(self, exporter=None, observed=None) -> bytes:
        out: list[str] = []
        for metric in self.all:
            metric.render(out)
        if observed is not None:  # what the router sees; labels are the configured models only
            name = "groq_proxy_observed_latency_ms"
            out.append(f"# HELP {name} Observed latency per model as the router sees it (p50/p90 of the last "
                       "answers): kind ttft for streams' first token, total for plain answers.\n"
                       f"# TYPE {name} gauge\n")
            for key in observed.keys():
                for kind, stream in (("ttft", True), ("total", False)):
                    for quantile, value in (("0.5", observed.expected(key, stream)), ("0.9", observed.p90(key, stream))):
                        if value is not None:
                            out.append(f"{name}{_labels(('model', 'kind', 'quantile'), (key, kind, quantile))} "
                                       f"{_num(round(value, 3))}\n")
        if exporter is not None:  # the trace exporter's own health: spans sent and spans lost
            out.append("# HELP groq_proxy_trace_spans_exported_total Spans the collector accepted.\n"
                       "# TYPE groq_proxy_trace_spans_exported_total counter\n"
                       f"groq_proxy_trace_spans_exported_total {exporter.exported}\n"
                       "# HELP groq_proxy_trace_spans_dropped_total Spans lost: export failed or queue full.\n"
                       "# TYPE groq_proxy_trace_spans_dropped_total counter\n"
                       f'groq_proxy_trace_spans_dropped_total{{reason="export_failed"}} {exporter.failed}\n'
                       f'groq_proxy_trace_spans_dropped_total{{reason="queue_full"}} {exporter.tracer.dropped}\n')
        return "".join(out).encode()
