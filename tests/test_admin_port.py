"""`server.admin_port` with the real `groq-proxy serve`: the admin API on its own port (found from the
`admin_listening` log line), 404 on the public port, the benchmark run from there through the public port, and
a taken admin port refused in one line."""

from __future__ import annotations

import socket

import aiohttp

from proxy.sim.testing import ScriptedUpstream
from tests.conftest import ADMIN, ADMIN_KEY
from tests.procs import Proc, clean_env, start_serving

CONFIG = """
[server]
admin_key_env = "TEST_ADMIN_KEY"
admin_port = {admin_port}

[providers.up]
base_url = "{url}"

[models.tier-test]
chain = ["up:m1"]
"""


async def test_the_admin_api_on_its_own_port(aiohttp_server, tmp_path):
    scripted = ScriptedUpstream()
    url = f"http://127.0.0.1:{(await aiohttp_server(scripted.app())).port}/openai/v1"
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG.format(admin_port=0, url=url))
    proc, base = await start_serving(tmp_path, "proxy", "--config", str(path), "--no-check",
                                     env=clean_env(TEST_ADMIN_KEY=ADMIN_KEY))
    try:
        admin = (await proc.wait_for_log(lambda line: line["event"] == "admin_listening"))["url"]
        assert admin != base
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/admin/config", headers=ADMIN) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_url"
            async with session.get(admin + "/admin/config", headers=ADMIN) as resp:
                assert resp.status == 200 and (await resp.json())["server"]["admin_key"] == "[masked]"
            body = {"model": "tier-test", "prompt": "hi", "runs": 2, "max_tokens": 5}
            async with session.post(admin + "/admin/benchmark", json=body, headers=ADMIN) as resp:
                assert resp.status == 200 and (await resp.json())["summary"]["succeeded"] == 2
            async with session.post(admin + "/admin/reload", headers=ADMIN) as resp:
                assert resp.status == 200 and (await resp.json())["generation"] == 2
        assert len(scripted.requests) == 2  # the benchmark's runs reached the upstream through the public port
    finally:
        await proc.stop()


async def test_a_taken_admin_port_is_refused_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "proxy.toml"
        path.write_text(CONFIG.format(admin_port=port, url="http://127.0.0.1:9/openai/v1"))
        proc = await Proc(tmp_path, "proxy").start("serve", "--config", str(path), "--no-check", "--port", "0",
                                                   env=clean_env(TEST_ADMIN_KEY=ADMIN_KEY))
        try:
            assert await proc.wait() == 1
        finally:
            await proc.stop()
    assert f"groq-proxy: server.admin_port: cannot listen on http://127.0.0.1:{port}: " in proc.stderr
    assert "Traceback" not in proc.stderr
