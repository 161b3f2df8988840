"""The stores' owner map (policies.stores.base.Owners), both versions through the same tests, and what the files
API does when the store that holds it is down: it fails closed, never guessing who owns what."""

from __future__ import annotations

import io
import os

import openai
import pytest

from policies.identity import hash_key
from policies.stores.base import StoreUnavailable
from policies.stores.memory import MemoryStore
from policies.stores.redis import RedisStore
from proxy.sim.simulator import build_simulator_app
from tests.conftest import config_for


async def test_owners_are_recorded_read_and_dropped(store):
    await store.set_owner("file:f1", "alpha", 3600)
    await store.set_owner("batch:b1", "bravo", 3600)
    assert await store.owners(["file:f1", "batch:b1", "file:nobody"]) == ["alpha", "bravo", None]
    assert await store.owners([]) == []
    await store.drop_owner("file:f1")
    await store.drop_owner("file:never")
    assert await store.owners(["file:f1", "batch:b1"]) == [None, "bravo"]


async def test_an_owner_lapses_with_its_ttl_in_memory():
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    await store.set_owner("file:f1", "alpha", 60)
    now[0] += 59
    assert await store.owners(["file:f1"]) == ["alpha"]
    now[0] += 2
    assert await store.owners(["file:f1"]) == [None]
    now[0] += 60  # the next write prunes what expired, so ids seen once do not pile up
    await store.set_owner("file:f2", "alpha", 60)
    assert list(store._owners) == ["file:f2"]


async def test_an_owner_lapses_with_its_ttl_in_redis(redis_url):
    prefix = f"t{os.urandom(6).hex()}:"
    store = RedisStore(redis_url, prefix=prefix)
    await store.start()
    try:
        await store.set_owner("file:f1", "alpha", 3600)
        ttl_ms = await store._client.pttl(prefix + "own:file:f1")
        assert 3_500_000 < ttl_ms <= 3_600_000
    finally:
        await store.close()


async def test_a_store_down_fails_closed(redis_server):
    store = RedisStore(redis_server.url)
    await store.start()
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await store.owners(["file:f1"])
        with pytest.raises(StoreUnavailable):  # within the retry pause: at once, without trying
            await store.set_owner("file:f1", "alpha", 60)
    finally:
        await store.close()


async def test_files_answer_503_while_the_owner_store_is_down(aiohttp_server, start_proxy, redis_server):
    app = build_simulator_app()
    sim_files = next(r.handler.__self__ for r in app.router.routes() if r.handler.__name__ == "upload")
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}/openai/v1"
    key = "gp-test-owner-store-down"
    config = config_for(url, auth={"keys": [{"id": "alpha", "sha256": hash_key(key)}]},
                        store={"backend": "redis", "url": redis_server.url},
                        policies=[{"use": "rate_limit", "requests_per_minute": 1000}])
    base = await start_proxy(config)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    made = await client.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    redis_server.stop()
    calls = (client.files.list(), client.files.retrieve(made.id),
             client.files.create(file=("c.jsonl", io.BytesIO(b"{}\n")), purpose="batch"))
    for call in calls:
        with pytest.raises(openai.InternalServerError) as info:
            await call
        assert info.value.status_code == 503 and info.value.code == "policy_unavailable"
    assert len(sim_files.files) == 1  # the upload was refused before the provider made a file nobody would own
    await client.close()


def test_several_workers_with_auth_need_a_shared_store():
    from policies.config import check_workers
    from proxy.app.config import ConfigError

    config = config_for("http://127.0.0.1:1/openai/v1", auth={"keys": [{"id": "a", "sha256": hash_key("k")}]})
    check_workers(config.policies, 1)
    with pytest.raises(ConfigError, match=r"^store.backend: 4 worker processes .* owns each file and batch"):
        check_workers(config.policies, 4)
    shared = config_for("http://127.0.0.1:1/openai/v1", auth={"keys": [{"id": "a", "sha256": hash_key("k")}]},
                        store={"backend": "redis", "url": "redis://127.0.0.1:1/0"})
    check_workers(shared.policies, 4)


async def test_owners_are_shared_by_replicas_on_redis(aiohttp_server, start_proxy, redis_store_table):
    server = await aiohttp_server(build_simulator_app())
    url = f"http://127.0.0.1:{server.port}/openai/v1"
    keys = {"keys": [{"id": "alpha", "sha256": hash_key("gp-alpha-key")}, {"id": "bravo", "sha256": hash_key("gp-b")}]}
    config = config_for(url, auth=keys, store=redis_store_table)  # [auth] and [store], no policy at all
    one, two = await start_proxy(config), await start_proxy(config)
    alpha_one = openai.AsyncOpenAI(base_url=one + "/v1", api_key="gp-alpha-key", max_retries=0)
    alpha_two = openai.AsyncOpenAI(base_url=two + "/v1", api_key="gp-alpha-key", max_retries=0)
    bravo_two = openai.AsyncOpenAI(base_url=two + "/v1", api_key="gp-b", max_retries=0)
    made = await alpha_one.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    assert (await alpha_two.files.retrieve(made.id)).id == made.id  # the other replica knows whose it is
    assert [f.id for f in (await alpha_two.files.list()).data] == [made.id]
    with pytest.raises(openai.NotFoundError):
        await bravo_two.files.retrieve(made.id)
    for client in (alpha_one, alpha_two, bravo_two):
        await client.close()
