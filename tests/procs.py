"""The real `groq-proxy` command in a subprocess, for the tests that run it as a user does.

Output goes to files (no pipe can fill up and block the process); every process is stopped by the test that
started it. A server is started on port 0 and its port read from the "listening" line it prints once bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from pathlib import Path

import aiohttp
import orjson

_SCRIPT = Path(sys.executable).with_name("groq-proxy")
GROQ_PROXY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]
READY_WITHIN_S = 30.0
_LISTENING = re.compile(r"listening on (http://\S+?)(?:/openai/v1)?(?: |$)", re.MULTILINE)


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
    """A subprocess whose stdout and stderr go to files."""

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
        """SIGTERM; a proxy that starts draining (server.drain_s of grace) gets a second one, which cuts the
        drain short, so a test does not wait the grace out."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        deadline = asyncio.get_running_loop().time() + 10
        hurried = False
        while self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 0.05)
            except TimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    self.process.kill()
                    await self.process.wait()
                elif not hurried and '"drain_started"' in self.stderr:
                    hurried = True
                    self.process.terminate()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def log_lines(self) -> list[dict]:
        """The JSON log lines of stderr (other lines, like the listening banner, are skipped)."""
        return [orjson.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    def other_lines(self) -> list[str]:
        """The lines of stderr that are not JSON log lines."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]

    async def wait_for_log(self, match, within_s: float = READY_WITHIN_S) -> dict:
        """The first JSON log line for which `match(line)` is true, waiting for it to be written."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            for line in self.log_lines():
                if match(line):
                    return line
            assert asyncio.get_running_loop().time() < deadline, f"no such log line in {within_s}s: {self.stderr}"
            await asyncio.sleep(0.02)

    async def wait_listening(self, stream: str = "stderr") -> str:
        """The base URL from the "listening on" line, printed only once the socket is bound."""
        deadline = asyncio.get_running_loop().time() + READY_WITHIN_S
        while True:
            found = _LISTENING.search(getattr(self, stream))
            if found:
                return found.group(1)
            assert self.process.returncode is None, f"exited {self.process.returncode}: {self.stderr}"
            assert asyncio.get_running_loop().time() < deadline, f"not listening in {READY_WITHIN_S}s: {self.stderr}"
            await asyncio.sleep(0.02)


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


async def start_serving(tmp_path: Path, name: str, *args: str, env: dict[str, str]) -> tuple[Proc, str]:
    """`groq-proxy serve --port 0 ARGS`: the process and its base URL, once ready."""
    proc = await Proc(tmp_path, name).start("serve", "--port", "0", *args, env=env)
    try:
        base = await proc.wait_listening()
        await wait_ready(proc, base)
    except BaseException:
        await proc.stop()
        raise
    return proc, base
