"""The structured log lines: one JSON object per line, written in batches, secrets removed."""

from __future__ import annotations

import logging

import orjson
import pytest

from proxy.telemetry import logs

LIBRARIES = ("aiohttp", "asyncio", "py.warnings")


@pytest.fixture
def json_logging():
    """setup_logging for one test, everything it changes put back after."""
    library = {name: logging.getLogger(name) for name in LIBRARIES}
    saved = (list(logs.log.handlers), logs.log.level, logs.log.propagate, logs._direct,
             {name: (list(lg.handlers), lg.level, lg.propagate) for name, lg in library.items()})
    try:
        yield
    finally:
        logs.log.handlers[:], logs.log.level, logs.log.propagate, logs._direct = saved[:4]
        for name, (handlers, level, propagate) in saved[4].items():
            library[name].handlers[:], library[name].propagate = handlers, propagate
            library[name].setLevel(level)
        logging.captureWarnings(False)


def test_info_lines_written_directly_match_the_formatter_and_are_redacted(capsys, json_logging):
    """With setup_logging's writer as the only handler, info lines skip the LogRecord; they must be the same
    JSON lines the formatter writes, secrets removed."""
    logs.register_secrets("sk-direct-path-secret")
    logs.setup_logging("info")
    logs.emit(logging.INFO, "attempt", target="up:m1", detail="echoed sk-direct-path-secret", ms=1.5)
    logs.emit(logging.WARNING, "attempt", target="up:m2", outcome="fell_over")
    logs._direct.flush()
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(l["level"], l["event"], l["target"]) for l in lines] == [
        ("info", "attempt", "up:m1"), ("warning", "attempt", "up:m2")]
    assert lines[0]["detail"] == "echoed [redacted]" and set(lines[0]) == {"ts", "level", "event", "target", "detail", "ms"}


def test_what_aiohttp_and_asyncio_log_becomes_one_json_line_each(capsys, json_logging):
    """Before: aiohttp's "Error handling request" went to stderr as a multi-line traceback, unformatted."""
    logs.setup_logging("info")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    logging.getLogger("aiohttp.access").info("an access line below the libraries' warning floor")
    logs._direct.flush()
    err = capsys.readouterr().err
    lines = [orjson.loads(line) for line in err.splitlines()]
    assert [(l["level"], l["event"]) for l in lines] == [
        ("error", "Error handling request from 127.0.0.1"), ("error", "Task exception was never retrieved")]
    assert "ValueError: boom\nsecond line" in lines[0]["exception"]


def test_a_line_built_whole_is_written_as_built_and_redacted(capsys, json_logging, caplog):
    """emit_line (the request line): the same JSON line on the direct path, the same record otherwise."""
    logs.register_secrets("sk-prebuilt-line-secret")
    logs.setup_logging("info")
    built = {"ts": 1.5, "level": "info", "event": "request", "status": 200, "detail": "sk-prebuilt-line-secret"}
    logs.emit_line(logging.INFO, built)
    logs._direct.flush()
    [line] = [orjson.loads(text) for text in capsys.readouterr().err.splitlines()]
    assert line == {**built, "detail": "[redacted]"}

    logs.log.handlers.append(caplog.handler)  # another handler: the record path, as an operator's would get
    logs.emit_line(logging.INFO, built)
    [record] = [r for r in caplog.records if r.getMessage() == "request"]
    assert record.fields == {"status": 200, "detail": "sk-prebuilt-line-secret"}
    assert orjson.loads(logs.JsonFormatter().format(record))["detail"] == "[redacted]"
