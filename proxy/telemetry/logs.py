"""Structured logs: one JSON object per line on stderr, secrets removed before anything is written."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time

import orjson

log = logging.getLogger("groq_proxy")

_secrets: tuple[str, ...] = ()
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}


def register_secrets(*values: str | None) -> None:
    """Values (provider keys) that must never reach a log line, an error or a response."""
    global _secrets
    _secrets = tuple(sorted({v for v in (*_secrets, *values) if v and len(v) >= 4}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(line, default=str).decode())


class BatchingHandler(logging.StreamHandler):
    """Writes lines in batches: one write per line costs a request more than the line itself at thousands of
    requests a second. Warnings and errors go out at once; info lines within `max_delay_s`.

    `atomic_bytes` (set in `--workers` processes, which share one stderr): each write is whole lines of at most
    that many bytes, PIPE_BUF, so a pipe never interleaves two processes' lines mid-line."""

    atomic_bytes = 0

    def __init__(self, stream=None, max_lines: int = 256, max_delay_s: float = 0.2) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._max_lines = max_lines
        self._max_delay_s = max_delay_s
        self._timer = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line, record.levelno)

    def add_line(self, line: str, level: int) -> None:
        self._lines.append(line)
        if level >= logging.WARNING or len(self._lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._max_delay_s, self.flush)
            except RuntimeError:  # no event loop (a command, start-up): write now
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                if self.atomic_bytes:
                    for piece in _pieces(lines, self.atomic_bytes):
                        self.stream.write(piece)
                        self.stream.flush()
                else:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
            except (OSError, ValueError):
                pass


def _pieces(lines: list[str], limit: int):
    piece, size = [], 0
    for line in lines:
        n = len(line.encode()) + 1
        if piece and size + n > limit:
            yield "\n".join(piece) + "\n"
            piece, size = [], 0
        piece.append(line)
        size += n
    if piece:
        yield "\n".join(piece) + "\n"


_direct: BatchingHandler | None = None  # set while our batching writer is the logger's only handler


def setup_logging(level: str = "info") -> None:
    global _direct
    handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for old in log.handlers:
        old.flush()
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    # What libraries log (aiohttp's server and client, asyncio's "exception never retrieved", Python warnings,
    # the OpenTelemetry SDK's exporters and gRPC with `exporter = "sdk"`, from their own threads) becomes JSON
    # lines too: a plain-text or multi-line traceback on stderr would break every reader of the log.
    logging.captureWarnings(True)
    for name in ("aiohttp", "asyncio", "py.warnings", "opentelemetry", "grpc"):
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.propagate = False
        library.setLevel(max(logging.WARNING, log.level))
    _direct = handler
    atexit.register(handler.flush)


def emit(level: int, event: str, **fields) -> None:
    if log.isEnabledFor(level):
        direct = _direct
        handlers = log.handlers
        if direct is not None and level < logging.WARNING and len(handlers) == 1 and handlers[0] is direct:
            # The per-request lines: the same JSON line the formatter makes, without building a LogRecord.
            line = {"ts": round(time.time(), 3), "level": _LEVELS[level], "event": event}
            line.update(fields)
            direct.add_line(redact(orjson.dumps(line, default=str).decode()), level)
            return
        exc_info = fields.pop("exc_info", None)
        if exc_info is True:
            exc_info = sys.exc_info()
        # makeRecord + handle: the same record as log.log() makes, without walking the stack for the caller.
        log.handle(log.makeRecord(log.name, level, "groq_proxy", 0, event, (), exc_info, extra={"fields": fields}))


def direct_writer(level: int) -> "BatchingHandler | None":
    """The batching writer when a line of this level may go to it as text, without a LogRecord: info lines while
    it is the logger's only handler (what `emit` and `emit_line` do themselves)."""
    direct = _direct
    if direct is not None and level < logging.WARNING:
        handlers = log.handlers
        if len(handlers) == 1 and handlers[0] is direct:
            return direct
    return None


def emit_line(level: int, line: dict) -> None:
    """A line already built as the JSON object it becomes (`ts`, `level`, `event` first, then its fields): the
    per-request line goes out without a keyword-argument copy. The caller has checked the level."""
    direct = _direct
    handlers = log.handlers
    if direct is not None and level < logging.WARNING and len(handlers) == 1 and handlers[0] is direct:
        direct.add_line(redact(orjson.dumps(line, default=str).decode()), level)
        return
    fields = {k: v for k, v in line.items() if k not in ("ts", "level", "event")}
    log.handle(log.makeRecord(log.name, level, "groq_proxy", 0, line["event"], (), None, extra={"fields": fields}))


def now_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
