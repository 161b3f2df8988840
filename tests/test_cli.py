"""The real `groq-proxy` command in a subprocess: serve (simulated, strict, with a bad config), simulate, models.

Upstreams are the simulator, either in the test's loop on port 0 or as `groq-proxy simulate`. Every process
is stopped in `finally`; readiness is polled on /readyz with a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from proxy.sim.simulator import start_simulator

_SCRIPT = Path(sys.executable).with_name("groq-proxy")
GROQ_PROXY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]
SECRET = "gsk_cli_test_SECRET_9f8e7d6c5b4a"
READY_WITHIN_S = 30.0
MISSING_A = "llama-3.3-70b-versatile"  # retired: the simulator does not list it
MISSING_B = "made-up/model-9000"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would pick a config or a key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROQ_", "TEST_UPSTREAM"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess whose stdout and stderr go to files (no pipe can fill up and block it)."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *args: str, env: dict[str, str]) -> "Proc":
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = await asyncio.create_subprocess_exec(
                *GROQ_PROXY, *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )
        return self

    async def wait(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def log_lines(self) -> list[dict]:
        """The JSON log lines of stderr (other lines, like the listening banner, are skipped)."""
        lines = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                lines.append(orjson.loads(line))
        return lines


async def run(tmp_path: Path, name: str, *args: str, env: dict[str, str]) -> Proc:
    """Runs a command to its end."""
    proc = await Proc(tmp_path, name).start(*args, env=env)
    try:
        await proc.wait()
    finally:
        await proc.stop()
    return proc


async def wait_ready(proc: Proc, base: str) -> None:
    deadline = asyncio.get_running_loop().time() + READY_WITHIN_S
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.process.returncode is None, f"exited {proc.process.returncode}: {proc.stderr}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        return
            assert asyncio.get_running_loop().time() < deadline, f"not ready in {READY_WITHIN_S}s: {proc.stderr}"
            await asyncio.sleep(0.05)


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
    assert "provider groq: 6 models served" in proc.stdout
    assert "provider plain: 6 models served" in proc.stdout
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
