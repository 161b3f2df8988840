"""`groq_proxy_reloads_total{result}` and `groq_proxy_config_generation` on /metrics: in one process, and
merged across `--workers` (the counter summed, the gauge one series per worker)."""

from __future__ import annotations

import re
import signal

import aiohttp
import pytest

from proxy.app.config import load_config
from proxy.app.server import build_app
from proxy.app.workers import SUPPORTED as WORKERS_SUPPORTED
from tests.conftest import ADMIN, ADMIN_KEY, until
from tests.procs import clean_env, start_serving

GOOD = '[server]\nadmin_key_env = "TEST_ADMIN_KEY"\n[models.tier-mine]\nchain = ["groq:openai/gpt-oss-20b"]\n'
BAD = '[server]\nadmin_key_env = "TEST_ADMIN_KEY"\n[models.tier-mine]\nchain = ["nowhere:m"]\n'


def samples(text: str, name: str) -> dict[str, float]:
    """The series of one family: labels text (`{...}` or "") -> value."""
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}}|) (\S+)$", text, re.M)}


async def get(base: str, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.request(method, base + path, headers=headers) as resp:
            return resp.status, await resp.text()


async def test_reloads_are_counted_by_result_and_the_generation_shown(aiohttp_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_KEY", ADMIN_KEY)
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD)
    server = await aiohttp_server(build_app(load_config(path), simulate=True))
    base = f"http://127.0.0.1:{server.port}"

    async def scrape() -> tuple[dict, dict]:
        status, text = await get(base, "/metrics")
        assert status == 200
        assert text.count("# TYPE groq_proxy_reloads_total counter") == 1
        assert text.count("# TYPE groq_proxy_config_generation gauge") == 1
        return samples(text, "groq_proxy_reloads_total"), samples(text, "groq_proxy_config_generation")

    assert await scrape() == ({'{result="ok"}': 0, '{result="error"}': 0}, {"": 1})
    assert (await get(base, "/admin/reload", "POST", ADMIN))[0] == 200
    path.write_text(BAD)
    assert (await get(base, "/admin/reload", "POST", ADMIN))[0] == 400
    assert await scrape() == ({'{result="ok"}': 1, '{result="error"}': 1}, {"": 2})
    path.write_text(GOOD)
    assert (await get(base, "/admin/reload", "POST", ADMIN))[0] == 200
    assert await scrape() == ({'{result="ok"}': 2, '{result="error"}': 1}, {"": 3})


@pytest.mark.skipif(not WORKERS_SUPPORTED, reason="serve --workers needs SO_REUSEPORT (Linux)")
async def test_with_workers_the_counter_is_summed_and_the_generation_shown_per_worker(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD)
    proc, base = await start_serving(tmp_path, "proxy", "--simulate", "--workers", "2", "--config", str(path),
                                     env=clean_env(TEST_ADMIN_KEY=ADMIN_KEY))
    try:
        path.write_text(BAD)
        proc.process.send_signal(signal.SIGHUP)  # the supervisor passes it to both workers; both refuse
        await until(lambda: [x["event"] for x in proc.log_lines()].count("config_reload_refused") == 2, timeout=30,
                    what="both workers refused the file")
        path.write_text(GOOD)
        status, answer = await get(base, "/admin/reload", "POST", ADMIN)  # one worker, then its sibling
        assert status == 200, answer
        complete = 0
        for _ in range(20):  # whichever worker answers the scrape, it covers both (on a loaded machine a sibling
            status, text = await get(base, "/metrics")  # may miss one scrape: such a scrape says so, and is skipped)
            assert status == 200
            if samples(text, "groq_proxy_workers_scraped") != {"": 2}:
                continue
            assert samples(text, "groq_proxy_reloads_total") == {'{result="ok"}': 2, '{result="error"}': 2}
            assert samples(text, "groq_proxy_config_generation") == {'{worker="0"}': 2, '{worker="1"}': 2}
            complete += 1
            if complete == 4:
                break
        assert complete == 4
    finally:
        await proc.stop()
