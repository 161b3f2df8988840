"""The children the bench starts: each in its own session with its output in a log file, stopped at the end;
and the helper servers that say where they listen with a `listening on http://HOST:PORT` line."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.errors import BenchError

REPO = Path(__file__).resolve().parent.parent


class Process:
    """A child in its own session (a terminal Ctrl-C reaches us, and we stop it), output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def start_announcing(name: str, argv: list[str], log: Path) -> tuple[Process, int]:
    """Starts a child that prints "listening on http://HOST:PORT" once it listens; returns it and the port."""
    proc = Process(name, argv, log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = proc.log.read_text(errors="replace")
        if "listening on http://" in text:
            return proc, int(text.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
        if not proc.alive():
            break
        time.sleep(0.05)
    proc.stop()
    raise BenchError(f"the {name} did not start:\n{proc.tail()}")
