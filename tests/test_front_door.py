"""What reaches the proxy below the JSON layer: malformed HTTP, oversized heads, stalled and abandoned
uploads, idle connections. Raw sockets against a real `groq-proxy serve` process, whose stderr must stay one
JSON object per line whatever a client sends (a multi-line traceback per bad request would let any client
flood and break the log).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time

import orjson
import pytest

from tests.procs import GROQ_PROXY, clean_env

READ_TIMEOUT_S = 1.0  # short for the test, yet far above any gap between two writes of a test below
SAFETY_S = 20.0  # only against a hang: every wait below ends on an event (a byte, a close, a log line)
CHAT = b'{"model": "t", "messages": [{"role": "user", "content": "hi"}]}'


class Served:
    """One `groq-proxy serve --simulate` for the module, on port 0, with a short read timeout."""

    def __init__(self, tmp_path) -> None:
        config = tmp_path / "front.toml"
        config.write_text(
            f"[server]\nrequest_read_timeout_s = {READ_TIMEOUT_S}\nmax_body_bytes = 4096\n"
            '[providers.groq]\nbase_url = "http://127.0.0.1:9/v1"\n'
            '[models.t]\nchain = ["groq:openai/gpt-oss-20b"]\n'
        )
        self.err_path = tmp_path / "serve.err"
        with open(self.err_path, "wb") as err:
            self.process = subprocess.Popen([*GROQ_PROXY, "serve", "--simulate", "--port", "0", "--config",
                                             str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=err, env=clean_env())
        deadline = time.monotonic() + SAFETY_S
        while not (found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.stderr())):
            assert self.process.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.02)
        self.port = int(found.group(1))

    def stderr(self) -> str:
        return self.err_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_lines(self) -> list[dict]:
        """Every line of stderr but the banner, each of which must be one JSON object."""
        text = self.stderr()
        assert "Traceback" not in text
        lines = [line for line in text.splitlines() if not line.startswith("groq-proxy listening on")]
        assert len(lines) == len(text.splitlines()) - 1
        return [orjson.loads(line) for line in lines]

    def wait_for_log(self, **fields) -> dict:
        """The one log line with these fields (batched info lines reach the file within a fraction of a second)."""
        deadline = time.monotonic() + SAFETY_S
        while True:
            found = [line for line in self.log_lines() if all(line.get(k) == v for k, v in fields.items())]
            if found:
                assert len(found) == 1, found
                return found[0]
            assert time.monotonic() < deadline, f"no log line with {fields}: {self.stderr()}"
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=SAFETY_S)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = Served(tmp_path_factory.mktemp("front"))
    try:
        yield server
    finally:
        server.stop()


def exchange(served: Served, raw: bytes) -> bytes:
    """Sends `raw` and reads until the server closes the connection."""
    with served.connect() as sock:
        sock.sendall(raw)
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def openai_error(raw: bytes, status: int) -> tuple[dict, dict]:
    """(error object, headers) of an OpenAI-shaped error response with this status and a request id."""
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    assert re.fullmatch(r"req_[0-9a-f]{24}", headers["x-request-id"])
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error, headers


HOST = b"Host: proxy\r\n"

MALFORMED = [
    pytest.param(b"HELLO WORLD\r\n\r\n", 400, "bad_http_request", "Invalid method", id="garbage-request-line"),
    pytest.param(b"GET /healthz HTTP/9\r\n\r\n", 400, "bad_http_request", "Bad status line", id="bad-version"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400, "bad_http_request",
                 "HTTPS traffic", id="tls-on-the-http-port"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Length: abc\r\n\r\n" + CHAT, 400,
                 "bad_http_request", "Content-Length", id="content-length-not-a-number"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Length: -5\r\n\r\n" + CHAT, 400,
                 "bad_http_request", "Content-Length", id="content-length-negative"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST
                 + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}}\r\n0\r\n\r\n", 400,
                 "bad_http_request", "Transfer-Encoding", id="content-length-with-chunked"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Note: a\x00b\r\n\r\n", 400, "bad_http_request",
                 "header value", id="nul-in-a-header"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
                 "headers_too_large", "8190 bytes", id="header-over-max_header_bytes"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
                 431, "headers_too_large", "more than 100 headers", id="over-max_headers"),
    pytest.param(b"GET /v1/models/" + b"m" * 5000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414, "url_too_long",
                 "4096 bytes", id="url-over-max_url_bytes"),
]


@pytest.mark.parametrize("raw, status, code, says", MALFORMED)
def test_malformed_http_is_an_openai_error_and_one_json_log_line(served, raw, status, code, says):
    """Before: a text/plain 400 for each (431 never), no x-request-id, and a multi-line traceback on stderr."""
    error, headers = openai_error(exchange(served, raw), status)
    assert error["code"] == code and says in error["message"], error  # and the server closed the connection
    line = served.wait_for_log(request_id=headers["x-request-id"])
    assert line["event"] == "bad_http_request" and line["status"] == status and line["reason"] == code
    assert line["level"] == "info"


def test_headers_at_the_limits_are_accepted(served):
    """The other side of the 431s: 100 headers, one of 8190 bytes (name and value), a 4096-byte URL."""
    value = b"a" * (8190 - len(b"X-Big"))
    headers = HOST + b"X-Big: " + value + b"\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(97))
    raw = exchange(served, b"GET /healthz HTTP/1.1\r\n" + headers + b"Connection: close\r\n\r\n")
    assert parse(raw)[0] == 200, raw[:300]
    url = b"/v1/models/" + b"m" * (4096 - len(b"/v1/models/"))
    error, _ = openai_error(exchange(served, b"GET " + url + b" HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"),
                            404)
    assert error["code"] == "model_not_found"


def test_a_client_that_leaves_mid_upload_is_a_499_not_an_internal_error(served):
    """Before: `internal_error` with a ConnectionResetError traceback, and a 500."""
    with served.connect() as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 4000\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")  # the handler is running: now upload a bit
        sock.sendall(CHAT[:20])
    line = served.wait_for_log(event="client_closed", during="upload")
    assert line["status"] == 499 and line["path"] == "/v1/chat/completions"
    assert not [line for line in served.log_lines() if line["event"] == "internal_error"]
    metrics = exchange(served, b"GET /metrics HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n").decode()
    counted = re.findall(r'^groq_proxy_requests_total\{[^}]*status="(\d+)"\} (\d+)', metrics, re.MULTILINE)
    assert ("499", "1") in counted and not [s for s, _ in counted if s == "500"], counted


def test_a_client_that_leaves_mid_audio_upload_is_logged_as_for_chat(served):
    """Before: the 499 was counted, but no `client_closed` line said why (the audio upload had a reader of its own)."""
    with served.connect() as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 4000\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')
    line = served.wait_for_log(event="client_closed", during="upload", path="/v1/audio/transcriptions")
    assert line["status"] == 499
    assert not [line for line in served.log_lines() if line["event"] == "internal_error"]


def test_a_body_that_does_not_decompress_is_400_and_logs_no_error(served):
    """Before: a 500 `internal_error`, then aiohttp's own "Unhandled exception" traceback as it went on reading."""
    raw = exchange(served, b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Encoding: gzip\r\n"
                   b"Content-Length: 12\r\n\r\nnot gzip !!!")
    error, headers = openai_error(raw, 400)
    assert "could not be read" in error["message"]
    assert not [line for line in served.log_lines() if line["level"] == "error"], served.stderr()


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: pro", id="half-a-head"),
    ],
)
def test_a_connection_without_a_whole_request_head_is_closed_after_the_read_timeout(served, sent):
    """Before: kept open (75 s under `serve`, an hour under aiohttp's own default)."""
    with served.connect() as sock:
        sock.sendall(sent)
        assert read_to_close(sock) == b""  # the server closed it; SAFETY_S would raise first if it never did


def test_a_stalled_body_is_408_and_the_connection_closed(served):
    """Before: the handler waited for the rest of the body for ever."""
    with served.connect() as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + CHAT[:30])
        error, headers = openai_error(read_to_close(sock), 408)
    assert error["code"] == "request_timeout" and f"{READ_TIMEOUT_S:g} s" in error["message"]
    assert headers["connection"].lower() == "close"
    line = served.wait_for_log(event="request_timeout")
    assert line["status"] == 408


def test_an_idle_keep_alive_connection_is_closed_after_the_read_timeout(served):
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        first = b""
        while b'"ok"' not in first:
            first += sock.recv(65536)
        assert parse(first)[0] == 200
        assert read_to_close(sock) == b""


@pytest.mark.parametrize("depth", [255, 300, 1000])
def test_json_nested_deeper_than_the_limit_is_400(served, depth):
    """Before: depths 255 to 1,024 were parsed, then failed to serialize upstream: a 500 and a traceback."""
    body = b'{"model": "t", "messages": [{"role": "user", "content": "hi"}], "x": ' \
           + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    raw = b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Connection: close\r\n" \
          + b"Content-Length: %d\r\n\r\n" % len(body) + body
    error, _ = openai_error(exchange(served, raw), 400)
    assert error["code"] == "json_too_deep" and "254 levels" in error["message"]
    assert not [line for line in served.log_lines() if line["event"] == "internal_error"]


def test_a_client_request_id_is_not_echoed(served):
    """The id keys the proxy's logs and traces: the proxy makes its own, whatever the client sends."""
    raw = exchange(served, b"GET /v1/models HTTP/1.1\r\n" + HOST + b"x-request-id: client-chosen\r\n"
                   b"Connection: close\r\n\r\n")
    status, headers, _ = parse(raw)
    assert status == 200 and re.fullmatch(r"req_[0-9a-f]{24}", headers["x-request-id"])
