"""The structured log lines: one JSON object per line, written in batches, secrets removed."""

from __future__ import annotations

import logging

import orjson

from proxy.telemetry import logs


def test_info_lines_written_directly_match_the_formatter_and_are_redacted(capsys):
    """With setup_logging's writer as the only handler, info lines skip the LogRecord; they must be the same
    JSON lines the formatter writes, secrets removed."""
    saved = (list(logs.log.handlers), logs.log.level, logs.log.propagate, logs._direct)
    try:
        logs.register_secrets("sk-direct-path-secret")
        logs.setup_logging("info")
        logs.emit(logging.INFO, "attempt", target="up:m1", detail="echoed sk-direct-path-secret", ms=1.5)
        logs.emit(logging.WARNING, "attempt", target="up:m2", outcome="fell_over")
        logs._direct.flush()
        lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        logs.log.handlers[:], logs.log.level, logs.log.propagate, logs._direct = saved[0], saved[1], saved[2], saved[3]
    assert [(l["level"], l["event"], l["target"]) for l in lines] == [
        ("info", "attempt", "up:m1"), ("warning", "attempt", "up:m2")]
    assert lines[0]["detail"] == "echoed [redacted]" and set(lines[0]) == {"ts", "level", "event", "target", "detail", "ms"}
