"""The ingest HTTP API against a real Redis (aiohttp test server, in process)."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from catq.config import IngestConfig
from catq.ingest import make_app
from catq.messages import Prompt, decode
from catq.results import ResultStore

LIMITS = IngestConfig(max_text_chars=50, max_batch=3)


@pytest.fixture
async def client_for(bus):
    clients = []

    async def make(token: str | None = None) -> TestClient:
        app = make_app(bus, ResultStore(bus, 60), LIMITS, token)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def enqueued(bus) -> list[Prompt]:
    return [decode(f[b"message"]) for _, f in await bus.redis.xrange(bus.key("prompts"))]


async def test_single_batch_and_list_are_enqueued_with_queued_status(bus, client_for):
    client = await client_for()
    r1 = await client.post("/v1/prompts", json={"text": "1+1?", "task": "math"})
    r2 = await client.post("/v1/prompts", json={"prompts": [
        {"text": "Write a haiku", "task": "open"},
        {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "2+2?"}]}]})
    r3 = await client.post("/v1/prompts", json=[{"text": "3+3?", "task": "math"}])
    assert (r1.status, r2.status, r3.status) == (202, 202, 202)
    ids = (await r1.json())["ids"] + (await r2.json())["ids"] + (await r3.json())["ids"]
    prompts = await enqueued(bus)
    assert [p.prompt_id for p in prompts] == ids
    assert [p.task for p in prompts] == ["math", "open", "math", "math"]
    assert prompts[2].messages[0].role == "system" and prompts[2].question == "2+2?"
    got = await client.get(f"/v1/prompts/{ids[0]}")
    assert got.status == 200
    result = await got.json()
    assert result["prompt_id"] == ids[0] and result["status"] == "queued" and result["question"] == "1+1?"


async def test_result_fields_written_later_are_returned(bus, client_for):
    client = await client_for()
    (pid,) = (await (await client.post("/v1/prompts", json={"text": "q", "task": "math"})).json())["ids"]
    await ResultStore(bus, 60).update(pid, status="scored", cat_answer="4", rewards=[1.0, 0.0])
    result = await (await client.get(f"/v1/prompts/{pid}")).json()
    assert result["status"] == "scored" and result["rewards"] == [1.0, 0.0] and result["question"] == "q"
    assert (await client.get("/v1/prompts/nope")).status == 404


BAD_INPUTS = [
    (b"{not json", 400, "invalid JSON"),
    (json.dumps("just a string").encode(), 400, "body must be"),
    (json.dumps({"text": 5, "task": "math"}).encode(), 400, "text: must be a string"),
    (json.dumps({"text": "   ", "task": "math"}).encode(), 400, "is empty"),
    (json.dumps({"text": "q", "task": "poetry"}).encode(), 400, "unknown task 'poetry'"),
    (json.dumps({"text": "q", "messages": [], "task": "math"}).encode(), 400, "exactly one of"),
    (json.dumps({"text": "q", "colour": "red"}).encode(), 400, "unknown key 'colour'"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "is not one of"),
    (json.dumps({"messages": [{"role": "system", "content": "hi"}]}).encode(), 400, "'user' message"),
    (json.dumps({"text": "x" * 51, "task": "math"}).encode(), 413, "the limit is 50"),
    (json.dumps({"prompts": [{"text": "q"}] * 4}).encode(), 413, "the limit is 3"),
    (json.dumps({"prompts": []}).encode(), 400, "no prompts"),
    (json.dumps({"prompts": [{"text": "ok"}, {"text": "ok"}, {"text": ""}]}).encode(), 400, "prompts[2].text"),
]


@pytest.mark.parametrize("body,status,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
async def test_bad_input_gets_4xx_naming_the_problem_and_enqueues_nothing(bus, client_for, body, status, message):
    client = await client_for()
    response = await client.post("/v1/prompts", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    assert message in (await response.json())["error"]["message"]
    assert await enqueued(bus) == []
    assert await bus.redis.keys(bus.key("result:*")) == []


async def test_auth_on(bus, client_for):
    client = await client_for(token="s3cret")
    assert (await client.post("/v1/prompts", json={"text": "q"})).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.post("/v1/prompts", json={"text": "q"}, headers=wrong)).status == 401
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/v1/prompts/x")).status == 401
    assert await enqueued(bus) == []
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/prompts", json={"text": "q"}, headers=ok)).status == 202
    assert (await client.get("/metrics", headers=ok)).status == 200
    assert (await client.get("/healthz")).status == 200  # container healthchecks need no token


async def test_auth_off_and_health_and_metrics(bus, client_for):
    client = await client_for()
    await client.post("/v1/prompts", json={"text": "q"})
    await bus.ensure_group("prompts", "rollout")
    await bus.read("prompts", "rollout", "r1", count=1, message_type=Prompt)
    assert (await (await client.get("/healthz")).json())["status"] == "ok"
    text = await (await client.get("/metrics")).text()
    run = bus.run
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("catq_stream_length", (("run", run), ("stream", "prompts")))] == 1
    assert samples[("catq_group_pending", (("group", "rollout"), ("run", run), ("stream", "prompts")))] == 1
    assert samples[("catq_dead_letters", (("run", run),))] == 0
    assert "# TYPE catq_stream_length gauge" in text
