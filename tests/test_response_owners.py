"""With [auth], a stored response is its proxy key's: another key that names it as `previous_response_id` gets
the 404 OpenAI gives for an unknown id, and nothing goes upstream. Real openai clients, the simulator, both
stores."""

from __future__ import annotations

import openai
import pytest

from proxy.sim.simulator import build_simulator_app
from tests.conftest import config_for
from tests.test_files_batches import KEY_A, KEY_B, Recorder, auth, clients


@pytest.fixture
async def sim(aiohttp_server):
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    return recorder, f"http://127.0.0.1:{server.port}/openai/v1"


def _posts(recorder: Recorder) -> int:
    return sum(1 for method, path, _ in recorder.seen if method == "POST" and path.endswith("/responses"))


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_another_key_cannot_continue_a_response(sim, start_proxy, redis_store_table, backend):
    recorder, url = sim
    tables = {"auth": auth()}
    if backend == "redis":
        tables["store"] = redis_store_table
    base = await start_proxy(config_for(url, {"tier-test": ["openai/gpt-oss-20b"]}, **tables))
    a, b = clients(base)
    async with a, b:
        plain = await a.responses.create(model="tier-test", input="first question")
        stream = await a.responses.create(model="tier-test", input="second question", stream=True)
        streamed = [event async for event in stream][-1].response
        assert streamed.id != plain.id
        for made in (plain, streamed):
            sent = _posts(recorder)
            with pytest.raises(openai.NotFoundError) as info:
                await b.responses.create(model="tier-test", input="and then?", previous_response_id=made.id)
            assert info.value.status_code == 404
            assert info.value.body == {
                "message": f"Previous response with id '{made.id}' not found.", "type": "invalid_request_error",
                "param": "previous_response_id", "code": "previous_response_not_found"}
            assert _posts(recorder) == sent  # refused before anything went upstream
            # its owner continues it, streamed or not
            follow = await a.responses.create(model="tier-test", input="and then?", previous_response_id=made.id)
            assert follow.output_text
            # and the answer to B's own request is B's to continue, not A's
        mine = await b.responses.create(model="tier-test", input="b asks")
        assert (await b.responses.create(model="tier-test", input="more", previous_response_id=mine.id)).output_text
        with pytest.raises(openai.NotFoundError):
            await a.responses.create(model="tier-test", input="more", previous_response_id=mine.id)
        # an id nobody made answers the same
        with pytest.raises(openai.NotFoundError) as info:
            await a.responses.create(model="tier-test", input="more", previous_response_id="resp_unknown")
        assert info.value.body["code"] == "previous_response_not_found"


async def test_a_response_not_stored_is_nobodys(sim, start_proxy):
    """`store: false` keeps nothing upstream, so nothing is recorded: no key may continue it."""
    recorder, url = sim
    base = await start_proxy(config_for(url, {"tier-test": ["openai/gpt-oss-20b"]}, auth=auth()))
    a, b = clients(base)
    async with a, b:
        made = await a.responses.create(model="tier-test", input="hi", store=False)
        with pytest.raises(openai.NotFoundError):
            await a.responses.create(model="tier-test", input="more", previous_response_id=made.id)


async def test_without_auth_previous_response_id_goes_upstream(sim, start_proxy):
    recorder, url = sim
    base = await start_proxy(config_for(url, {"tier-test": ["openai/gpt-oss-20b"]}))
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client:
        follow = await client.responses.create(model="tier-test", input="more", previous_response_id="resp_other")
    assert follow.output_text and _posts(recorder) == 1
