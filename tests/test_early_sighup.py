"""SIGHUP while `groq-proxy serve` starts (proxy/app/early_sighup.py): the proxy, the workers' supervisor and a
worker still starting neither die of it nor lose it. The start is held in its catalogue check by an upstream
that answers GET /models only when the test says, so the signal lands in the slow part of the start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import aiohttp
import pytest
from aiohttp import web

from proxy.app.server import build_app
from proxy.app.config import load_config
from proxy.app.workers import SUPPORTED as WORKERS_SUPPORTED
from proxy.app.workers import Supervisor
from tests.conftest import until
from tests.procs import Proc, clean_env, wait_ready

KEY = "gsk_early_sighup_SECRET_0123456789"


@pytest.fixture
async def held_catalogue(aiohttp_server):
    """An upstream whose GET /models waits for `release`; `asked` is set when a start is waiting on it."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def models(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()
        return web.json_response({"object": "list", "data": [{"id": "m1", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/v1", asked, release


def config(url: str, tiers: list[str]) -> str:
    return (f'[providers.up]\nbase_url = "{url}"\napi_key_env = "HOLD_KEY"\n'
            + "".join(f'[models.{t}]\nchain = ["up:m1"]\n' for t in tiers))


async def model_ids(base: str) -> set[str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(base + "/v1/models") as resp:
            return {m["id"] for m in (await resp.json())["data"]}


@pytest.mark.parametrize("workers", [None, "2"])
async def test_a_sighup_during_the_catalogue_check_reloads_once_the_proxy_runs(tmp_path, held_catalogue, workers):
    """Before: the process died of the SIGHUP (exit -1, SIGHUP's default action), supervisor included."""
    if workers and not WORKERS_SUPPORTED:
        pytest.skip("serve --workers needs SO_REUSEPORT (Linux)")
    url, asked, release = held_catalogue
    path = tmp_path / "proxy.toml"
    path.write_text(config(url, ["tier-a"]))
    args = ["serve", "--port", "0", "--config", str(path)] + (["--workers", workers] if workers else [])
    proc = await Proc(tmp_path, "proxy").start(*args, env=clean_env(HOLD_KEY=KEY))
    try:
        await asyncio.wait_for(asked.wait(), 30)  # the start is in its catalogue check, the config read
        path.write_text(config(url, ["tier-a", "tier-b"]))
        proc.process.send_signal(signal.SIGHUP)  # pending in the process before the answer below reaches it
        release.set()
        base = await proc.wait_listening()
        await wait_ready(proc, base)
        if workers is None:  # the held SIGHUP reloads: the file changed after the start read it
            reloaded = await proc.wait_for_log(lambda line: line["event"] == "config_reloaded")
            assert reloaded["trigger"] == "SIGHUP" and reloaded["generation"] == 2
        # with workers, each read the file when it started, after the signal
        assert {"tier-a", "tier-b"} <= await model_ids(base)
        assert proc.process.returncode is None
    finally:
        release.set()
        await proc.stop()
    assert KEY not in proc.stderr


_WORKER = """
import os, signal, sys, time
out, go = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGHUP, lambda *_: open(out, "a").write("hup\\n"))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(out, "a").write("armed\\n")
while not os.path.exists(go):
    time.sleep(0.01)
print("listening on http://127.0.0.1:1", flush=True)
while True:
    time.sleep(1)
"""


async def test_a_worker_still_starting_gets_the_sighup_once_it_listens(tmp_path, proxy_log):
    """Before: the supervisor sent SIGHUP only to workers already listening, and one that had read the file but
    did not listen yet never reloaded. The worker here is a script that says when it is armed and listens only
    when the test creates its `go` file."""
    out, go = tmp_path / "worker.out", tmp_path / "go"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    supervisor = Supervisor(1, lambda index, sim: [sys.executable, str(script), str(out), str(go)])
    listening = asyncio.Event()
    run = asyncio.get_running_loop().create_task(supervisor.run(False, listening.set))
    try:
        await until(lambda: out.exists() and "armed" in out.read_text(), timeout=30, what="worker armed")
        os.kill(os.getpid(), signal.SIGHUP)  # to the supervisor (this process), while its worker starts
        await until(lambda: any(r.getMessage() == "supervisor_signal" for r in proxy_log.records), timeout=30,
                    what="the SIGHUP taken")
        assert "hup" not in out.read_text()  # not before it listens: before its handler, it would die of it
        go.touch()
        await asyncio.wait_for(listening.wait(), 30)
        await until(lambda: "hup" in out.read_text(), timeout=30, what="the SIGHUP forwarded once listening")
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_the_end_of_the_app_puts_back_what_sighup_did_before(aiohttp_server, tmp_path):
    """Before: the app's end left SIGHUP's default action, and a SIGHUP while spans were still being flushed
    ended the process."""
    def before(signum, frame) -> None:  # never called: only compared
        pass

    previous = signal.signal(signal.SIGHUP, before)
    try:
        path = tmp_path / "proxy.toml"
        path.write_text(config("http://127.0.0.1:1/v1", ["tier-a"]))
        server = await aiohttp_server(build_app(load_config(path, env={"HOLD_KEY": KEY})))
        assert signal.getsignal(signal.SIGHUP) is not before  # the running app's handler
        await server.close()
        assert signal.getsignal(signal.SIGHUP) is before
    finally:
        signal.signal(signal.SIGHUP, previous)


async def test_the_console_script_holds_sighup_before_it_imports_the_server(tmp_path):
    """The slow imports (aiohttp, a few hundred milliseconds) come after `hold()`: the script records what was
    imported when SIGHUP was held, then `serve` ends on a bad flag."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import signal, sys\n"
        "from proxy.app import early_sighup\n"
        "hold = early_sighup.hold\n"
        "def probe():\n"
        "    hold()\n"
        "    print('aiohttp' in sys.modules, signal.getsignal(signal.SIGHUP) is early_sighup._remember, flush=True)\n"
        "early_sighup.hold = probe\n"
        "from proxy.app.entry import main\n"
        "sys.exit(main(['serve', '--port', '70000']))\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=clean_env())
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, err
    assert out.decode().splitlines()[0] == "False True"  # held, and aiohttp not imported yet


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighups_from_the_sigterm_to_the_exit_do_not_end_the_process(tmp_path, workers):
    """The README: from the end of the drain to the exit SIGHUP is held. Before, two windows of SIGHUP's default
    action (death): the interpreter's end, which puts it back for every signal with a Python handler (the exit
    was 129 instead of 0), and the instant the app's end removed the loop's handler before putting the held
    one back (a worker died of it, in about one storm in eight, and the supervisor exited 1)."""
    if workers == "2" and not WORKERS_SUPPORTED:
        pytest.skip("serve --workers needs SO_REUSEPORT (Linux)")
    path = tmp_path / "proxy.toml"
    path.write_text("[server]\ndrain_s = 0.2\n")
    proc = Proc(tmp_path, "serve")
    await proc.start("serve", "--simulate", "--port", "0", "--config", str(path), "--workers", workers,
                     env=clean_env())
    try:
        await wait_ready(proc, await proc.wait_listening())
        proc.process.terminate()
        sent = 0
        while proc.process.returncode is None:
            # os.kill, not send_signal: that one polls, and its waitpid would reap the exit from asyncio's watcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.process.pid, signal.SIGHUP)
            sent += 1
            try:
                await asyncio.wait_for(proc.process.wait(), 0.001)
            except TimeoutError:
                pass
        exits = [line for line in proc.log_lines() if line["event"] in ("worker_exited", "worker_failed_to_start")]
        assert (proc.process.returncode, exits) == (0, []), proc.stderr[-3000:]
        assert sent > 10
    finally:
        await proc.stop()
