"""The real `groq-proxy` command in a subprocess: serve (simulated, strict, with a bad config), simulate, models.

Upstreams are the simulator, either in the test's loop on port 0 or as `groq-proxy simulate`. Every process
is stopped in `finally`; readiness is polled on /readyz with a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from proxy.sim.simulator import start_simulator
from tests.procs import READY_WITHIN_S, Proc, clean_env, free_port, run, start_serving, wait_ready

SECRET = "gsk_cli_test_SECRET_9f8e7d6c5b4a"
MISSING_A = "llama-3.3-70b-versatile"  # retired: the simulator does not list it
MISSING_B = "made-up/model-9000"


def write_config(tmp_path: Path, sim_url: str, *, name: str = "config.toml", extra: str = "") -> Path:
    """Provider `groq` at the simulator (Groq-style /openai/v1 URL), `plain` at its /v1 twin."""
    plain_url = sim_url.removesuffix("/openai/v1") + "/v1"
    path = tmp_path / name
    path.write_text(
        f"""
[providers.groq]
base_url = "{sim_url}"
api_key_env = "SIM_KEY"

[providers.plain]
base_url = "{plain_url}"

[models.tier-fast]
chain = ["groq:{MISSING_A}", "groq:openai/gpt-oss-20b"]

[models.tier-other]
chain = ["plain:qwen/qwen3.6-27b", "plain:{MISSING_B}"]

[aliases]
"llama3-8b-8192" = "groq:openai/gpt-oss-20b"
{extra}
"""
    )
    return path


@pytest.fixture
async def simulator():
    runner, url = await start_simulator()
    try:
        yield url
    finally:
        await runner.cleanup()


def assert_no_secret(*procs: Proc) -> None:
    for proc in procs:
        assert SECRET not in proc.stdout
        assert SECRET not in proc.stderr


# --- serve ------------------------------------------------------------------------------------------------


async def test_serve_without_config_or_key_answers_from_the_simulator(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await Proc(tmp_path, "serve").start("serve", "--port", str(port), env=clean_env())
    try:
        await wait_ready(proc, base)

        def ask():
            with openai.OpenAI(base_url=f"{base}/v1", api_key="anything", max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="tier-fast", messages=[{"role": "user", "content": "hello"}]
                )
                return raw.headers, raw.parse()

        headers, completion = await asyncio.to_thread(ask)
    finally:
        await proc.stop()
    assert headers["x-groq-proxy-simulated"] == "true"
    assert headers["x-groq-proxy-model"] == "openai/gpt-oss-20b"
    assert completion.choices[0].message.content
    warnings = [line for line in proc.log_lines() if line["event"] == "simulated_upstream"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert "simulator" in warnings[0]["message"] and "GROQ_API_KEY" in warnings[0]["message"]
    assert "simulated upstream" in proc.stderr


VALID = '[providers.groq]\nbase_url = "http://127.0.0.1:9/v1"\n[models.t]\nchain = ["groq:m"]\n'


def bad_configs():
    return [
        pytest.param(VALID + "[server]\nprot = 8080\n", "server.prot", id="unknown-key"),
        pytest.param(VALID + "[server]\nport = 70000\n", "server.port", id="port-out-of-range"),
        pytest.param('[providers.groq]\nbase_url = "http://h/v1"\napi_key = "' + SECRET + '"\n'
                     '[models.t]\nchain = ["groq:m"]\n', "providers.groq.api_key", id="key-in-file"),
        pytest.param('[providers.groq]\nbase_url = "http://h/v1"\n[models.t]\nchain = ["openai:m"]\n',
                     "models.t.chain[0]", id="unknown-provider"),
        pytest.param('[providers.groq]\nbase_url = "http://h/v1"\ntimeout_s = "slow"\n',
                     "providers.groq.timeout_s", id="timeout-not-a-number"),
        pytest.param("[providers.groq\n", "not valid TOML", id="not-toml"),
    ]


@pytest.mark.parametrize("text, names", bad_configs())
async def test_serve_with_a_bad_config_exits_naming_the_key(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = await run(tmp_path, "serve", "serve", "--config", str(path), "--port", str(free_port()), env=clean_env())
    assert proc.process.returncode == 2
    assert "config error" in proc.stderr
    assert names in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_secret(proc)


async def test_serve_reads_the_config_named_by_the_environment(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(VALID + "[routing]\ncooldown = 3\n")
    env = clean_env(GROQ_PROXY_CONFIG=str(path))
    proc = await run(tmp_path, "serve", "serve", "--port", str(free_port()), env=env)
    assert proc.process.returncode == 2
    assert "routing.cooldown" in proc.stderr


async def test_serve_with_a_config_but_no_key_refuses_instead_of_simulating(tmp_path, simulator):
    path = write_config(tmp_path, simulator)
    proc = await run(tmp_path, "serve", "serve", "--config", str(path), "--port", str(free_port()), env=clean_env())
    assert proc.process.returncode == 2
    assert "providers.groq.api_key_env" in proc.stderr and "SIM_KEY" in proc.stderr


async def test_serve_strict_refuses_to_start_with_a_missing_model(tmp_path, simulator):
    path = write_config(tmp_path, simulator)
    proc = await run(
        tmp_path, "serve", "serve", "--strict", "--config", str(path), "--port", str(free_port()),
        env=clean_env(SIM_KEY=SECRET),
    )
    assert proc.process.returncode not in (0, None)
    assert "refusing to start" in proc.stderr
    assert f"models.tier-fast.chain[0]: groq:{MISSING_A}" in proc.stderr
    assert f"models.tier-other.chain[1]: plain:{MISSING_B}" in proc.stderr
    assert "gpt-oss-20b" not in proc.stderr.split("refusing to start", 1)[1]
    assert_no_secret(proc)


async def test_serve_without_strict_warns_once_per_missing_model_and_falls_over(tmp_path, simulator):
    path = write_config(tmp_path, simulator)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await Proc(tmp_path, "serve").start(
        "serve", "--config", str(path), "--port", str(port), env=clean_env(SIM_KEY=SECRET)
    )
    try:
        await wait_ready(proc, base)
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="tier-fast", messages=[{"role": "user", "content": "hello"}]
            )
    finally:
        await proc.stop()
    # The missing first link answers 404 model_not_found upstream; the chain moves on.
    assert raw.headers["x-groq-proxy-model"] == "openai/gpt-oss-20b"
    assert raw.headers["x-groq-proxy-attempts"] == "2"
    assert "x-groq-proxy-simulated" not in raw.headers  # a configured upstream, not the embedded simulator
    missing = [line for line in proc.log_lines() if line["event"] == "model_missing"]
    assert sorted(line["target"] for line in missing) == sorted([f"groq:{MISSING_A}", f"plain:{MISSING_B}"])
    assert all(line["level"] == "warning" for line in missing)
    assert not [line for line in proc.log_lines() if line["event"] == "simulated_upstream"]
    assert_no_secret(proc)


# --- models -----------------------------------------------------------------------------------------------


async def test_models_prints_each_entry_as_available_or_missing(tmp_path, simulator):
    path = write_config(tmp_path, simulator)
    proc = await run(tmp_path, "models", "models", "--config", str(path), env=clean_env(SIM_KEY=SECRET))
    assert proc.process.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts and parts[-1] in ("available", "MISSING", "unknown"):
            rows[parts[0]] = (parts[-2], parts[-1])
    assert rows == {
        "models.tier-fast.chain[0]": (f"groq:{MISSING_A}", "MISSING"),
        "models.tier-fast.chain[1]": ("groq:openai/gpt-oss-20b", "available"),
        "models.tier-other.chain[0]": ("plain:qwen/qwen3.6-27b", "available"),
        "models.tier-other.chain[1]": (f"plain:{MISSING_B}", "MISSING"),
        "llama3-8b-8192": ("groq:openai/gpt-oss-20b", "available"),
    }
    # the simulator's chat, embedding, Whisper and Orpheus models
    assert "provider groq: 10 models served" in proc.stdout
    assert "provider plain: 10 models served" in proc.stdout
    assert_no_secret(proc)


async def test_models_json_parses(tmp_path, simulator):
    path = write_config(tmp_path, simulator)
    proc = await run(tmp_path, "models", "models", "--json", "--config", str(path), env=clean_env(SIM_KEY=SECRET))
    assert proc.process.returncode == 0, proc.stderr
    report = orjson.loads(proc.stdout)
    assert set(report["providers"]) == {"groq", "plain"}
    assert "openai/gpt-oss-20b" in report["providers"]["groq"]["models"]
    assert report["providers"]["groq"]["error"] is None
    available = {e["where"]: e["available"] for e in report["entries"]}
    assert available == {
        "models.tier-fast.chain[0]": False,
        "models.tier-fast.chain[1]": True,
        "models.tier-other.chain[0]": True,
        "models.tier-other.chain[1]": False,
        "aliases.llama3-8b-8192": True,
    }
    assert {e["target"] for e in report["entries"] if not e["available"]} == {
        f"groq:{MISSING_A}", f"plain:{MISSING_B}"
    }
    assert_no_secret(proc)


async def test_models_reports_an_unreachable_provider_without_the_key(tmp_path, simulator):
    dead = f"http://127.0.0.1:{free_port()}/openai/v1"
    path = tmp_path / "dead.toml"
    path.write_text(
        f'[providers.groq]\nbase_url = "{dead}"\napi_key_env = "SIM_KEY"\nconnect_timeout_s = 2\n'
        '[models.t]\nchain = ["groq:openai/gpt-oss-20b"]\n'
    )
    proc = await run(tmp_path, "models", "models", "--json", "--config", str(path), env=clean_env(SIM_KEY=SECRET))
    assert proc.process.returncode == 0, proc.stderr
    report = orjson.loads(proc.stdout)
    assert report["providers"]["groq"]["models"] is None
    assert report["providers"]["groq"]["error"]
    assert report["entries"] == [{"where": "models.t.chain[0]", "target": "groq:openai/gpt-oss-20b",
                                  "available": None}]
    assert_no_secret(proc)


async def test_models_against_the_simulate_command(tmp_path):
    port = free_port()
    sim = await Proc(tmp_path, "simulate").start("simulate", "--port", str(port), env=clean_env())
    try:
        sim_url = f"http://127.0.0.1:{port}/openai/v1"
        deadline = asyncio.get_running_loop().time() + READY_WITHIN_S
        async with aiohttp.ClientSession() as session:
            while True:
                assert sim.process.returncode is None, sim.stderr
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{sim_url}/models") as resp:
                        if resp.status == 200:
                            break
                assert asyncio.get_running_loop().time() < deadline, "simulator did not start"
                await asyncio.sleep(0.05)
        path = write_config(tmp_path, sim_url)
        proc = await run(tmp_path, "models", "models", "--json", "--config", str(path), env=clean_env(SIM_KEY=SECRET))
    finally:
        await sim.stop()
    assert proc.process.returncode == 0, proc.stderr
    entries = orjson.loads(proc.stdout)["entries"]
    assert [e["available"] for e in entries] == [False, True, True, False, True]
    assert f"listening on {sim_url}" in sim.stdout
    assert_no_secret(proc, sim)


# --- start-up mistakes: one line, no traceback, nothing printed as "listening" ------------------------------


def one_line_error(proc: Proc) -> str:
    """The one non-JSON line a failed start prints (JSON log lines written before it are allowed)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "listening" not in proc.stderr, proc.stderr
    lines = proc.other_lines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("groq-proxy: ")
    return lines[0]


async def test_serve_on_a_port_in_use_exits_with_one_line_and_never_says_listening(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await run(tmp_path, "serve", "serve", "--simulate", "--port", str(port), env=clean_env())
    assert proc.process.returncode == 1
    line = one_line_error(proc)
    assert f"cannot listen on http://127.0.0.1:{port}" in line and "address already in use" in line


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
async def test_serve_with_a_port_out_of_range_exits_naming_it(tmp_path, port):
    """Before: 99999 listened on 34463 (the OS took it modulo 65536); -1 ended in a traceback."""
    proc = await run(tmp_path, "serve", "serve", "--simulate", "--port", port, env=clean_env())
    assert proc.process.returncode == 2
    assert one_line_error(proc) == f"groq-proxy: --port: must be a port number from 0 to 65535, got {port}"


async def test_serve_on_a_host_that_does_not_resolve_exits_with_one_line(tmp_path):
    proc = await run(tmp_path, "serve", "serve", "--simulate", "--host", "no-such-host.invalid", "--port", "0",
                     env=clean_env())
    assert proc.process.returncode == 1
    assert one_line_error(proc).startswith("groq-proxy: cannot listen on http://no-such-host.invalid:0: ")


async def test_serve_port_zero_prints_the_port_it_bound(tmp_path):
    proc, base = await start_serving(tmp_path, "serve", "--simulate", env=clean_env())
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
    finally:
        await proc.stop()
    assert not base.endswith(":0")
    assert proc.stderr.count("listening on") == 1
    assert proc.process.returncode == 0  # SIGTERM: a graceful stop, as under web.run_app


async def test_a_config_file_that_is_not_utf8_exits_naming_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(VALID.encode() + "# café\n".encode("latin-1"))
    proc = await run(tmp_path, "serve", "serve", "--config", str(path), "--port", "0", env=clean_env())
    assert proc.process.returncode == 2
    assert one_line_error(proc) == (f"groq-proxy: config error: config: {path} is not UTF-8 text "
                                    f"(byte {len(VALID) + 5} is 0xe9); TOML files are UTF-8")


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--rate-429", "2", "--rate-429: must be a share between 0 and 1, got 2.0"),
        ("--rate-429", "-0.1", "--rate-429: must be a share between 0 and 1, got -0.1"),
        ("--rate-5xx", "1.5", "--rate-5xx: must be a share between 0 and 1, got 1.5"),
        ("--rate-cut", "nan", "--rate-cut: must be a share between 0 and 1, got nan"),
        ("--ttft-ms", "-5", "--ttft-ms: must be 0 or more, got -5.0"),
        ("--tokens-per-s", "-1", "--tokens-per-s: must be 0 or more, got -1.0"),
        ("--retry-after", "-2", "--retry-after: must be 0 or more, got -2"),
        ("--port", "70000", "--port: must be a port number from 0 to 65535, got 70000"),
        # inf would sleep every request forever (or pace it at no speed); nan compares false to every bound
        ("--ttft-ms", "inf", "--ttft-ms: must be a finite number, got inf"),
        ("--ttft-ms", "nan", "--ttft-ms: must be 0 or more, got nan"),
        ("--tokens-per-s", "inf", "--tokens-per-s: must be a finite number, got inf"),
        ("--tokens-per-s", "nan", "--tokens-per-s: must be 0 or more, got nan"),
        ("--ttft-ms=-inf", None, "--ttft-ms: must be 0 or more, got -inf"),
        ("--completion-tokens", "0", "--completion-tokens: must be from 1 to 65536, got 0"),
        ("--completion-tokens", "65537", "--completion-tokens: must be from 1 to 65536, got 65537"),
    ],
)
async def test_simulate_refuses_values_out_of_range_in_one_line(tmp_path, flag, value, says):
    proc = await run(tmp_path, "simulate", "simulate", flag, *([value] if value is not None else []), env=clean_env())
    assert proc.process.returncode == 2
    assert one_line_error(proc) == f"groq-proxy: {says}"


async def test_simulate_refuses_shares_that_add_up_to_more_than_one(tmp_path):
    proc = await run(tmp_path, "simulate", "simulate", "--rate-429", "0.6", "--rate-5xx", "0.6", env=clean_env())
    assert proc.process.returncode == 2
    assert one_line_error(proc) == "groq-proxy: simulate: rate_429 + rate_5xx must not exceed 1"


@pytest.mark.parametrize(
    "extra, key",
    [
        ("[routing]\ncooldown_s = 60\nmax_cooldown_s = 30\n", "routing.max_cooldown_s"),
        ('[providers.slow]\nbase_url = "http://h/v1"\ntimeout_s = 2\nconnect_timeout_s = 5\n',
         "providers.slow.connect_timeout_s"),
        ('[providers.spaced]\nbase_url = "http://my host/v1"\n', "providers.spaced.base_url"),
        ('[providers."a:b"]\nbase_url = "http://h/v1"\n', "providers.a:b"),
    ],
)
async def test_serve_refuses_inconsistent_config_naming_the_key(tmp_path, extra, key):
    path = tmp_path / "bad.toml"
    path.write_text(VALID + extra)
    proc = await run(tmp_path, "serve", "serve", "--config", str(path), "--port", "0", env=clean_env())
    assert proc.process.returncode == 2
    assert one_line_error(proc).startswith(f"groq-proxy: config error: {key}: ")


# --- what the README says each flag does, run as a user runs it ---------------------------------------------


async def test_serve_simulate_answers_from_the_simulator_even_with_a_config_and_key(tmp_path):
    """--simulate wins over a config whose provider cannot be reached and a key that is set."""
    dead = f"http://127.0.0.1:{free_port()}/openai/v1"
    path = tmp_path / "dead.toml"
    path.write_text(f'[providers.groq]\nbase_url = "{dead}"\napi_key_env = "SIM_KEY"\n'
                    '[models.tier-fast]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    proc, base = await start_serving(tmp_path, "serve", "--simulate", "--config", str(path),
                                     env=clean_env(SIM_KEY=SECRET))
    try:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="tier-fast", messages=[{"role": "user", "content": "hello"}])
    finally:
        await proc.stop()
    assert raw.headers["x-groq-proxy-simulated"] == "true"
    assert raw.parse().choices[0].message.content
    assert [line["event"] for line in proc.log_lines() if line["level"] == "warning"] == ["simulated_upstream"]
    assert "(simulated upstream)" in proc.stderr
    assert_no_secret(proc)


async def test_serve_no_check_skips_the_catalogue_check(tmp_path, simulator):
    """With --strict the same config refuses to start (two models missing); with --no-check it is never asked."""
    path = write_config(tmp_path, simulator)
    proc, base = await start_serving(tmp_path, "serve", "--strict", "--no-check", "--config", str(path),
                                     env=clean_env(SIM_KEY=SECRET))
    try:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="tier-fast", messages=[{"role": "user", "content": "hello"}])
    finally:
        await proc.stop()
    assert raw.headers["x-groq-proxy-model"] == "openai/gpt-oss-20b"
    events = {line["event"] for line in proc.log_lines()}
    assert "model_missing" not in events and "catalogue_unavailable" not in events
    assert "refusing to start" not in proc.stderr
    assert_no_secret(proc)


async def test_models_simulate_checks_against_the_built_in_simulator(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/openai/v1"
    path = tmp_path / "dead.toml"
    path.write_text(f'[providers.groq]\nbase_url = "{dead}"\napi_key_env = "SIM_KEY"\n'
                    f'[models.t]\nchain = ["groq:openai/gpt-oss-20b", "groq:{MISSING_B}"]\n')
    proc = await run(tmp_path, "models", "models", "--simulate", "--json", "--config", str(path),
                     env=clean_env(SIM_KEY=SECRET))
    assert proc.process.returncode == 0, proc.stderr
    report = orjson.loads(proc.stdout)
    assert report["providers"]["groq"]["error"] is None
    assert "openai/gpt-oss-20b" in report["providers"]["groq"]["models"]
    assert [(e["target"], e["available"]) for e in report["entries"]] == [
        ("groq:openai/gpt-oss-20b", True), (f"groq:{MISSING_B}", False)]
    assert "built-in simulator" in proc.stderr
    assert_no_secret(proc)


async def test_bench_model_url_measures_a_running_proxy(tmp_path):
    proxy, base = await start_serving(tmp_path, "serve", "--simulate", env=clean_env())
    try:
        bench = await run(tmp_path, "bench", "bench-model", "--url", base, "--model", "tier-fast", "--runs", "2",
                          "--max-tokens", "5", "--json", env=clean_env())
        await proxy.wait_for_log(lambda _: sum(line["event"] == "attempt" for line in proxy.log_lines()) >= 2)
    finally:
        await proxy.stop()
    assert bench.process.returncode == 0, bench.stderr
    report = orjson.loads(bench.stdout)
    assert report["summary"]["succeeded"] == 2 and report["summary"]["answered_by"] == {"openai/gpt-oss-20b": 2}
    # The runs went through that proxy: it logged one answered attempt per run, and nothing else served them.
    answered = [line for line in proxy.log_lines() if line["event"] == "attempt"]
    assert len(answered) == 2
    assert all(line["requested"] == "tier-fast" and line["outcome"] == "answered" for line in answered)


SIM_VALID = '[providers.groq]\nbase_url = "http://127.0.0.1:9/v1"\n[models.t]\nchain = ["groq:openai/gpt-oss-20b"]\n'


async def test_log_level_warning_writes_no_info_lines(tmp_path):
    path = tmp_path / "quiet.toml"
    path.write_text(SIM_VALID + '[server]\nlog_level = "warning"\n')
    proc, base = await start_serving(tmp_path, "serve", "--simulate", "--config", str(path), env=clean_env())
    try:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client", max_retries=0) as client:
            await client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hello"}])
    finally:
        await proc.stop()  # at exit the writer flushes whatever it holds: an info line would be there by now
    levels = [line["level"] for line in proc.log_lines()]
    assert levels == ["warning"], proc.stderr  # the simulated-upstream warning, and no attempt line


async def test_log_level_info_writes_the_attempt_line(tmp_path):
    """The other side of the filter: the same request at the default level logs its attempt."""
    path = tmp_path / "info.toml"
    path.write_text(SIM_VALID)
    proc, base = await start_serving(tmp_path, "serve", "--simulate", "--config", str(path), env=clean_env())
    try:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client", max_retries=0) as client:
            await client.chat.completions.create(model="t", messages=[{"role": "user", "content": "hello"}])
        line = await proc.wait_for_log(lambda line: line["event"] == "attempt")
    finally:
        await proc.stop()
    assert line["level"] == "info" and line["requested"] == "t"
