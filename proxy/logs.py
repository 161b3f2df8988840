"""Structured logs: one JSON object per line on stderr, secrets removed before anything is written."""

from __future__ import annotations

import logging
import sys
import time

import orjson

log = logging.getLogger("groq_proxy")

_secrets: tuple[str, ...] = ()


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


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def emit(level: int, event: str, **fields) -> None:
    if log.isEnabledFor(level):
        log.log(level, event, extra={"fields": fields})


def now_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
