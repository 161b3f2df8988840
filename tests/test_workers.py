"""`groq-proxy serve --workers N` run as an operator runs it: real subprocesses on one port (SO_REUSEPORT), the
supervisor's restarts, one /metrics for the whole proxy, one shared simulator, and the drain of every worker."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import aiohttp
import orjson
import pytest

from policies.identity import hash_key
from proxy.telemetry.worker_metrics import merge
from proxy.app.workers import SUPPORTED as WORKERS_SUPPORTED
from tests.procs import Proc, clean_env, run, start_serving
from tests.slow_streams import budget, events, streams_through_proxy

pytestmark = pytest.mark.skipif(not WORKERS_SUPPORTED, reason="serve --workers needs SO_REUSEPORT (Linux)")

CHAT = {"model": "tier-fast", "messages": [{"role": "user", "content": "hi"}]}


async def chat_on_new_connections(base: str, n: int) -> list[aiohttp.typedefs.CIMultiDictProxy]:
    """n plain requests, each on a connection of its own (the kernel picks a worker per connection)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async def one(_):
            async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
                return resp.headers
        return await asyncio.gather(*(one(i) for i in range(n)))


async def scrape(base: str) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


def requests_total(text: str) -> int:
    return sum(int(float(m)) for m in re.findall(r"^groq_proxy_requests_total\{[^}]*\} (\S+)$", text, re.M))


def worker_pid(proc: Proc, index: int) -> int:
    return [line["pid"] for line in proc.log_lines()
            if line["event"] == "worker_started" and line["worker"] == index][-1]


async def test_two_workers_share_one_port_one_simulator_and_one_metrics_view(tmp_path):
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", env=clean_env())
    try:
        proxy.process.send_signal(signal.SIGHUP)  # forwarded to every worker, which keeps serving
        await proxy.wait_for_log(lambda line: line.get("signal") == "SIGHUP")
        headers = await chat_on_new_connections(base, 40)
        assert all(h["x-groq-proxy-simulated"] == "true" for h in headers)
        for _ in range(6):  # whichever worker the kernel hands the scrape to, it counts all 40
            text = await scrape(base)
            assert requests_total(text) == 40
            assert "groq_proxy_workers 2\n" in text and "groq_proxy_workers_scraped 2\n" in text
        # Gauges do not add up: one series per worker, and both workers answered requests.
        assert re.search(r'^groq_proxy_observed_latency_ms\{[^}]*worker="0"\} ', text, re.M)
        assert re.search(r'^groq_proxy_observed_latency_ms\{[^}]*worker="1"\} ', text, re.M)
    finally:
        await proxy.stop()
    assert proxy.process.returncode == 0
    lines = proxy.log_lines()
    assert not [line for line in lines if line["event"] == "worker_exited"]
    simulators = [line for line in lines if line["event"] == "simulated_upstream"]
    assert len(simulators) == 1  # the supervisor's one simulator: every worker talks to the same upstream
    assert sorted(line["worker"] for line in lines if line["event"] == "worker_started") == [0, 1]
    assert len([line for line in lines if line["event"] == "drain_done"]) == 2
    assert re.search(r"listening on http://127\.0\.0\.1:\d+ \(simulated upstream, 2 workers\)", proxy.stderr)


async def test_a_worker_that_dies_is_restarted_and_logged(tmp_path):
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", env=clean_env())
    try:
        dead = worker_pid(proxy, 0)
        os.kill(dead, signal.SIGKILL)
        exited = await proxy.wait_for_log(lambda line: line["event"] == "worker_exited")
        assert (exited["worker"], exited["pid"], exited["code"]) == (0, dead, "SIGKILL")
        restarted = await proxy.wait_for_log(lambda line: line["event"] == "worker_restarted")
        assert restarted["worker"] == 0 and restarted["pid"] != dead and restarted["restarts"] == 1
        assert exited["level"] == "error"
        await chat_on_new_connections(base, 20)
        text = await scrape(base)
        assert "groq_proxy_workers_scraped 2\n" in text and requests_total(text) == 20
    finally:
        await proxy.stop()
    assert proxy.process.returncode == 0


async def test_more_than_one_worker_on_the_memory_store_is_refused(tmp_path):
    path = tmp_path / "memory.toml"
    path.write_text('[providers.sim]\nbase_url = "http://127.0.0.1:9/v1"\n[models.tier-test]\nchain = ["sim:m"]\n'
                    '[[policies]]\nuse = "token_budget"\ntokens = 1000\n')
    proc = await run(tmp_path, "refused", "serve", "--config", str(path), "--port", "0", "--workers", "2",
                     env=clean_env())
    assert proc.process.returncode == 2
    assert proc.stderr.strip() == ('groq-proxy: config error: store.backend: 2 worker processes on the memory store '
                                   'would each enforce the limits on their own (and keep their own cache); use backend = "redis"')
    with_key = tmp_path / "workers.toml"
    with_key.write_text("[server]\nworkers = 3\n" + path.read_text())
    proc = await run(tmp_path, "refused-config", "serve", "--config", str(with_key), "--port", "0", env=clean_env())
    assert proc.process.returncode == 2 and "store.backend: 3 worker processes" in proc.stderr
    proc = await run(tmp_path, "zero", "serve", "--port", "0", "--workers", "0", env=clean_env())
    assert proc.process.returncode == 2
    assert proc.stderr.strip() == "groq-proxy: --workers: must be from 1 to 64, got 0"


async def test_sigterm_to_the_supervisor_drains_every_worker(tmp_path, redis_store_table, start_proxy):
    async with streams_through_proxy(tmp_path, redis_store_table, {"drain_s": 1, "drain_timeout_s": 120, "workers": 2},
                                     tokens_per_s=25, max_tokens=100) as running:  # 4 s each
        proxy = running.proxy
        proxy.process.send_signal(signal.SIGTERM)
        bodies = await asyncio.wait_for(asyncio.gather(*running.streams), 120)
        assert await proxy.wait(60) == 0
    used = 0
    for raw in bodies:
        assert raw.endswith(b"data: [DONE]\n\n")
        used += orjson.loads(events(raw)[-2])["x_groq"]["usage"]["total_tokens"]
    lines = proxy.log_lines()
    assert [line["signal"] for line in lines if line["event"] == "supervisor_signal"] == ["SIGTERM"]
    drains = [line for line in lines if line["event"] == "drain_listener_closed"]
    assert len(drains) == 2 and sum(line["in_flight"] for line in drains) > 0
    assert [line["cut"] for line in lines if line["event"] == "drain_done"] == [0, 0]
    assert not [line for line in lines if line["event"] == "worker_exited"]
    state = await budget(start_proxy, running.config)
    assert (state["reserved"], state["used"]) == (0, used)


def test_merge_sums_counters_and_histograms_and_keeps_gauges_per_worker():
    one = ('# HELP c_total C.\n# TYPE c_total counter\nc_total{a="x"} 2\nc_total{a="y"} 1\n'
           '# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le="0.1"} 1\nh_seconds_bucket{le="+Inf"} 2\n'
           'h_seconds_sum 0.25\nh_seconds_count 2\n# HELP g G.\n# TYPE g gauge\ng{m="a b"} 7.5\ng_bare 1\n')
    two = ('# HELP c_total C.\n# TYPE c_total counter\nc_total{a="x"} 3\nc_total{a="z"} 4\n'
           '# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le="0.1"} 0\nh_seconds_bucket{le="+Inf"} 1\n'
           'h_seconds_sum 0.5\nh_seconds_count 1\n# HELP g G.\n# TYPE g gauge\ng{m="a b"} 2\n')
    assert merge({0: one, 1: two}).decode() == (
        '# HELP c_total C.\n# TYPE c_total counter\nc_total{a="x"} 5\nc_total{a="y"} 1\nc_total{a="z"} 4\n'
        '# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le="0.1"} 1\n'
        'h_seconds_bucket{le="+Inf"} 3\nh_seconds_sum 0.75\nh_seconds_count 3\n'
        '# HELP g G.\n# TYPE g gauge\ng{m="a b",worker="0"} 7.5\ng_bare{worker="0"} 1\ng{m="a b",worker="1"} 2\n')


async def test_worker_log_writes_are_whole_lines_within_pipe_buf():
    """Workers share one stderr: a write over PIPE_BUF to a pipe may interleave with another process's."""
    import io
    import select

    from proxy.telemetry.logs import BatchingHandler

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    stream = Writes()
    handler = BatchingHandler(stream)
    handler.atomic_bytes = select.PIPE_BUF
    lines = [orjson.dumps({"event": "attempt", "n": i, "detail": "é" * (i % 50)}).decode() for i in range(200)]
    for line in lines:
        handler.add_line(line, 20)  # batched: the loop's timer would flush them together
    assert stream.writes == []
    handler.flush()
    assert len(stream.writes) > 1
    assert all(w.endswith("\n") and len(w.encode()) <= select.PIPE_BUF for w in stream.writes)
    assert "".join(stream.writes).splitlines() == lines


async def test_a_port_in_use_is_one_line_before_any_worker_starts(tmp_path):
    """A plain listener, and another proxy's workers (which SO_REUSEPORT alone would let us join)."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = await run(tmp_path, "taken", "serve", "--port", str(port), "--workers", "2", env=clean_env())
    finally:
        taken.close()
    assert proc.process.returncode == 1
    assert proc.other_lines() == [f"groq-proxy: cannot listen on http://127.0.0.1:{port}: Address already in use"]
    assert not [line for line in proc.log_lines() if line["event"] == "worker_started"]
    first, base = await start_serving(tmp_path, "first", "--workers", "2", env=clean_env())
    try:
        port = base.rsplit(":", 1)[1]
        proc = await run(tmp_path, "second", "serve", "--port", port, "--workers", "2", env=clean_env())
        assert proc.process.returncode == 1
        assert proc.other_lines() == [f"groq-proxy: cannot listen on http://127.0.0.1:{port}: Address already in use"]
    finally:
        await first.stop()


async def test_a_sigterm_while_the_workers_start_is_a_clean_stop(tmp_path):
    """The signal reaches a worker once it listens (earlier, it would die of it before its handlers exist)."""
    proc = await Proc(tmp_path, "early").start("serve", "--port", "0", "--workers", "2", env=clean_env())
    await proc.wait_for_log(lambda line: line["event"] == "worker_started" and line["worker"] == 1)
    await proc.stop()
    assert proc.process.returncode == 0
    events = [line["event"] for line in proc.log_lines()]
    assert "worker_failed_to_start" not in events and "worker_exited" not in events
    assert events.count("drain_done") == 2


async def test_an_admin_reload_on_one_worker_reloads_every_worker(tmp_path):
    """POST /admin/reload reaches one worker (the kernel's choice), which has the other reload before it answers."""
    path = tmp_path / "proxy.toml"
    first = ('[server]\nadmin_key_env = "ADMIN_KEY"\n[providers.groq]\nbase_url = "http://127.0.0.1:9/openai/v1"\n'
             'api_key_env = "GROQ_KEY"\n[models.tier-a]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    path.write_text(first)
    env = clean_env(ADMIN_KEY="admin-key-for-the-test", GROQ_KEY="gsk_test_not_a_real_key")
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", "--simulate", "--config", str(path), env=env)
    try:
        path.write_text(first + '[models.tier-b]\nchain = ["groq:openai/gpt-oss-120b"]\n')
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.post(base + "/admin/reload",
                                    headers={"Authorization": "Bearer admin-key-for-the-test"}) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
                [(_, sibling)] = answer["workers"].items()
                assert sibling["status"] == "reloaded"
                # --workers 2 over a file without server.workers is no change to restart for (it said so before)
                assert answer["restart_required"] == [] and sibling["restart_required"] == []
            for _ in range(12):  # fresh connections: both workers answer some, on the new config already
                async with session.get(base + "/v1/models") as resp:
                    assert "tier-b" in {m["id"] for m in (await resp.json())["data"]}
    finally:
        await proxy.stop()
    lines = proxy.log_lines()
    assert sorted(line["trigger"] for line in lines if line["event"] == "config_reloaded") == ["admin", "sibling"]


async def test_a_key_revoked_by_an_admin_reload_is_refused_by_every_worker_once_the_call_returns(
        tmp_path, redis_store_table):
    """Before, the call answered 200 once its own worker had reloaded, and the supervisor's SIGHUP reached the
    other later: a script that revoked a leaked key and checked it at once found it still served there."""
    keep, revoked = "gp-test-key-that-stays", "gp-test-key-that-leaked"
    store = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in redis_store_table.items())

    def text(keys: list[str]) -> str:
        entries = "".join(f'[[auth.keys]]\nid = "k{i}"\nsha256 = "{hash_key(k)}"\n' for i, k in enumerate(keys))
        return ('[server]\nadmin_key_env = "ADMIN_KEY"\n[providers.groq]\nbase_url = "http://127.0.0.1:9/openai/v1"\n'
                'api_key_env = "GROQ_KEY"\n[models.tier-fast]\nchain = ["groq:openai/gpt-oss-20b"]\n'
                f"[store]\n{store}{entries}")

    path = tmp_path / "proxy.toml"
    path.write_text(text([keep, revoked]))
    env = clean_env(ADMIN_KEY="admin-key-for-the-test", GROQ_KEY="gsk_test_not_a_real_key")
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", "--simulate", "--config", str(path), env=env)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async def status_with(key: str) -> int:
                async with session.post(base + "/v1/chat/completions", json=CHAT,
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    return resp.status

            assert await status_with(revoked) == 200
            path.write_text(text([keep]))
            async with session.post(base + "/admin/reload",
                                    headers={"Authorization": "Bearer admin-key-for-the-test"}) as resp:
                assert resp.status == 200, await resp.text()
            statuses = await asyncio.gather(*(status_with(revoked) for _ in range(30)))
            assert statuses == [401] * 30
            assert await status_with(keep) == 200
    finally:
        await proxy.stop()


async def test_admin_port_0_with_workers_is_refused(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text('[server]\nadmin_key_env = "ADMIN_KEY"\nadmin_port = 0\n[providers.sim]\n'
                    'base_url = "http://127.0.0.1:9/v1"\n[models.tier-test]\nchain = ["sim:m"]\n')
    proc = await run(tmp_path, "admin0", "serve", "--config", str(path), "--port", "0", "--workers", "2",
                     env=clean_env(ADMIN_KEY="admin-key-for-the-test"))
    assert proc.process.returncode == 2
    assert proc.stderr.strip() == ("groq-proxy: config error: server.admin_port: 0 (any free port) would give each of "
                                   "the 2 workers an admin port of its own; name a port")


async def test_every_worker_listens_on_the_admin_port_with_the_workers_flag(tmp_path):
    """--workers (not server.workers) must reach the admin listener too, which binds with SO_REUSEPORT then."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        admin_port = probe.getsockname()[1]
    path = tmp_path / "proxy.toml"
    path.write_text(f'[server]\nadmin_key_env = "ADMIN_KEY"\nadmin_port = {admin_port}\n[providers.groq]\n'
                    'base_url = "http://127.0.0.1:9/openai/v1"\n[models.tier-a]\nchain = ["groq:openai/gpt-oss-20b"]\n')
    env = clean_env(ADMIN_KEY="admin-key-for-the-test")
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", "--simulate", "--config", str(path), env=env)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(6):
                async with session.get(f"http://127.0.0.1:{admin_port}/admin/config",
                                       headers={"Authorization": "Bearer admin-key-for-the-test"}) as resp:
                    assert resp.status == 200
    finally:
        await proxy.stop()
    assert proxy.process.returncode == 0
    assert not [line for line in proxy.log_lines() if line["event"] in ("worker_exited", "worker_failed_to_start")]


async def test_a_reload_to_the_memory_store_is_refused_with_several_workers(tmp_path, redis_store_table):
    """The start refuses policies on the memory store with --workers 2; a reload to it did not (200), and each
    worker then enforced every limit on its own. Now the reload answers 400 naming the key, and Redis stays."""
    store = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in redis_store_table.items())
    head = ('[server]\nadmin_key_env = "ADMIN_KEY"\n[providers.groq]\nbase_url = "http://127.0.0.1:9/openai/v1"\n'
            'api_key_env = "GROQ_KEY"\n[models.tier-fast]\nchain = ["groq:openai/gpt-oss-20b"]\n'
            '[[policies]]\nuse = "rate_limit"\nper = "global"\nrequests_per_minute = 100000\n')
    path = tmp_path / "proxy.toml"
    path.write_text(head + f"[store]\n{store}")
    env = clean_env(ADMIN_KEY="admin-key-for-the-test", GROQ_KEY="gsk_test_not_a_real_key")
    proxy, base = await start_serving(tmp_path, "proxy", "--workers", "2", "--simulate", "--config", str(path), env=env)
    admin = {"Authorization": "Bearer admin-key-for-the-test"}
    try:
        path.write_text(head + '[store]\nbackend = "memory"\n')
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.post(base + "/admin/reload", headers=admin) as resp:
                assert resp.status == 400, await resp.text()
                assert "store.backend" in (await resp.json())["error"]["message"]
            for _ in range(6):  # both workers still on Redis
                async with session.get(base + "/admin/config", headers=admin) as resp:
                    assert (await resp.json())["policies"]["store"]["backend"] == "redis"
    finally:
        await proxy.stop()
