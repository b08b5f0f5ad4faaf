"""The gateway end to end: the official ``openai`` client, through the gateway under a real
uvicorn on loopback, to real ``llama-server`` processes serving the tiny model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from hangar.clock import ManualClock, SystemClock
from hangar.llm.engine import EngineBinary
from hangar.llm.gateway import Gateway, GatewayConfig
from hangar.llm.native import EngineProcess
from hangar.llm.pool import PoolPolicy
from hangar.llm.seams import Caller, Deployment, ReplicaState
from tests.llm.conftest import pumping, serving, until
from tests.llm.gated import GatedTransport
from tests.llm.seams_impl import DeploymentList, ProcessReplicas, TokenTable, UsageLog

pytestmark = pytest.mark.slow

# Served by the one shared engine, which must never be suspended: min_replicas=1.
ACME_TINY = Deployment(
    id="d-acme-tiny", org="acme", name="tiny", min_replicas=1, created_at=1_700_000_000
)
ACME_OTHER = Deployment(id="d-acme-other", org="acme", name="other", min_replicas=1)
GLOBEX_TINY = Deployment(id="d-globex-tiny", org="globex", name="tiny", min_replicas=1)
GLOBEX_SECRET = Deployment(id="d-globex-secret", org="globex", name="secret", min_replicas=1)
TOKENS = {
    "tok-acme": Caller(org="acme", token_id="t-acme"),
    "tok-globex": Caller(org="globex", token_id="t-globex"),
    "key-acme-other": Caller(org="acme", token_id="k-other", deployment="d-acme-other"),
}
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello to the world"}]
NO_WAIT = GatewayConfig(reconcile_interval_s=0)


@dataclass
class World:
    replicas: ProcessReplicas
    deployments: DeploymentList
    usage: UsageLog
    auth: TokenTable

    def gateway(
        self,
        config: GatewayConfig = NO_WAIT,
        clock: ManualClock | SystemClock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Gateway:
        return Gateway(
            self.auth,
            self.deployments,
            self.replicas,
            self.usage,
            clock=clock,
            config=config,
            transport=transport,
        )

    def deploy(self, deployment: Deployment) -> Deployment:
        self.deployments.deployments.append(deployment)
        return deployment


@pytest.fixture
def world(
    engine_binary: EngineBinary, tiny_model: Path, shared_engine: EngineProcess, tmp_path: Path
) -> Iterator[World]:
    """Two orgs; every deployment above served by the one shared engine."""
    replicas = ProcessReplicas(engine_binary.path, tiny_model, tmp_path)
    deployments = DeploymentList([ACME_TINY, ACME_OTHER, GLOBEX_TINY, GLOBEX_SECRET])
    for deployment in deployments.deployments:
        replicas.adopt(deployment, shared_engine)
    try:
        yield World(replicas, deployments, UsageLog(), TokenTable(dict(TOKENS)))
    finally:
        replicas.stop_all()


def client(base_url: str, token: str = "tok-acme") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0)


async def test_models_lists_the_callers_deployments_only(world: World) -> None:
    async with serving(world.gateway()) as url:
        acme = await client(url).models.list()
        assert [(m.id, m.owned_by) for m in acme.data] == [("other", "acme"), ("tiny", "acme")]
        assert acme.data[1].created == 1_700_000_000
        globex = await client(url, "tok-globex").models.list()
        assert sorted(m.id for m in globex.data) == ["secret", "tiny"]
        keyed = await client(url, "key-acme-other").models.list()
        assert [m.id for m in keyed.data] == ["other"]
        assert (await client(url).models.retrieve("tiny")).owned_by == "acme"
        with pytest.raises(openai.NotFoundError):
            await client(url).models.retrieve("secret")


async def test_chat_completion_has_openai_structure_and_is_metered(world: World) -> None:
    async with serving(world.gateway()) as url:
        answer = await client(url).chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=12, temperature=0, seed=7
        )
    assert answer.object == "chat.completion"
    assert answer.model == "tiny"
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 12
    assert answer.usage.prompt_tokens > 0
    [record] = world.usage.records
    assert (record.org, record.deployment, record.token_id, record.endpoint) == (
        "acme",
        "d-acme-tiny",
        "t-acme",
        "chat.completions",
    )
    assert (record.prompt_tokens, record.completion_tokens) == (answer.usage.prompt_tokens, 12)


async def test_text_completions_are_deterministic_at_temperature_zero(world: World) -> None:
    async with serving(world.gateway()) as url:
        api = client(url)
        first = await api.completions.create(
            model="tiny", prompt="hello world", max_tokens=16, temperature=0, seed=3
        )
        second = await api.completions.create(
            model="tiny", prompt="hello world", max_tokens=16, temperature=0, seed=3
        )
        other = await api.completions.create(
            model="tiny", prompt="the machine says", max_tokens=16, temperature=0, seed=3
        )
    assert first.object == "text_completion"
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].text != other.choices[0].text
    assert first.usage is not None and first.usage.completion_tokens == 16
    assert [r.endpoint for r in world.usage.records] == ["completions"] * 3


async def test_a_stream_is_passed_on_event_by_event(world: World) -> None:
    """The first event reaches the client while the gateway is held mid-answer, and the whole
    stream says what the unstreamed answer says."""
    transport = GatedTransport()
    async with serving(world.gateway(transport=transport)) as url:
        api = client(url)
        whole = await api.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=24, temperature=0, seed=1
        )
        stream = await api.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=24, temperature=0, seed=1, stream=True
        )
        events = stream.__aiter__()
        first = await asyncio.wait_for(events.__anext__(), 30)
        assert transport.held == 1, "the client got an event while the gateway was held"
        transport.gate.set()
        chunks = [first] + [chunk async for chunk in events]
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks), "usage was not asked for"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed = world.usage.records[-1]
    assert streamed.completion_tokens == 24 and streamed.prompt_tokens > 0


async def test_stream_usage_is_shown_when_asked(world: World) -> None:
    async with serving(world.gateway()) as url:
        stream = await client(url).completions.create(
            model="tiny",
            prompt="one two three",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert usage and usage[-1].completion_tokens == 10
    assert world.usage.records[-1].completion_tokens == 10


async def test_embeddings(world: World) -> None:
    async with serving(world.gateway()) as url:
        api = client(url)
        answer = await api.embeddings.create(model="tiny", input=["hello world", "tiny model"])
        again = await api.embeddings.create(model="tiny", input=["hello world", "tiny model"])
    assert [item.index for item in answer.data] == [0, 1]
    vectors = [item.embedding for item in answer.data]
    assert all(len(vector) == 64 for vector in vectors)
    assert all(sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-4) for vector in vectors)
    assert vectors[0] != vectors[1]
    for repeated, vector in zip(again.data, vectors, strict=True):
        assert repeated.embedding == pytest.approx(vector, abs=1e-5)
    assert answer.usage.prompt_tokens > 0
    record = world.usage.records[0]
    assert (record.endpoint, record.completion_tokens) == ("embeddings", 0)


async def test_orgs_cannot_reach_each_others_models(world: World) -> None:
    async with serving(world.gateway()) as url:
        acme = client(url)
        with pytest.raises(openai.NotFoundError) as foreign:
            await acme.chat.completions.create(model="secret", messages=CHAT, max_tokens=2)
        with pytest.raises(openai.NotFoundError) as absent:
            await acme.chat.completions.create(model="nothing", messages=CHAT, max_tokens=2)
        keyed = client(url, "key-acme-other")
        with pytest.raises(openai.NotFoundError) as outside_key:
            await keyed.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        allowed = await keyed.chat.completions.create(model="other", messages=CHAT, max_tokens=2)
        same_name = await client(url, "tok-globex").completions.create(
            model="tiny", prompt="hi", max_tokens=2
        )
    assert foreign.value.body == _renamed(absent.value.body, "nothing", "secret")
    assert foreign.value.code == "model_not_found" and foreign.value.param == "model"
    assert outside_key.value.code == "model_not_found"
    assert allowed.choices and same_name.choices
    assert [(r.org, r.deployment) for r in world.usage.records] == [
        ("acme", "d-acme-other"),
        ("globex", "d-globex-tiny"),
    ]


def _renamed(body: object, old: str, new: str) -> object:
    return json.loads(json.dumps(body).replace(f"`{old}`", f"`{new}`"))


async def test_bad_requests_get_openai_shaped_errors(world: World) -> None:
    gateway = world.gateway(GatewayConfig(reconcile_interval_s=0, max_body_bytes=2048))
    async with serving(gateway) as url:
        with pytest.raises(openai.AuthenticationError) as unknown:
            await client(url, "tok-nobody").models.list()
        assert unknown.value.type == "authentication_error"
        async with httpx.AsyncClient(base_url=url) as raw:
            auth = {"authorization": "Bearer tok-acme"}
            missing = await raw.get("/models")
            not_json = await raw.post("/completions", content=b"{", headers=auth)
            no_model = await raw.post("/completions", json={"prompt": "x"}, headers=auth)
            too_big = await raw.post(
                "/completions", json={"model": "tiny", "prompt": "x" * 4096}, headers=auth
            )
            no_route = await raw.get("/nowhere", headers=auth)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (not_json.status_code, no_model.status_code) == (400, 400)
    assert no_model.json()["error"]["param"] == "model"
    assert too_big.status_code == 413
    assert no_route.status_code == 404
    for response in (missing, not_json, no_model, too_big, no_route):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert world.usage.records == []


async def test_a_replica_killed_mid_stream_gives_a_clean_error(world: World) -> None:
    deployment = world.deploy(Deployment(id="d-fragile", org="acme", name="fragile"))
    world.replicas.parallel, world.replicas.context = 1, 4096
    replica = world.replicas.add(deployment, started=True)
    transport = GatedTransport()
    async with serving(world.gateway(transport=transport)) as url:
        api = client(url)
        stream = await api.completions.create(
            model="fragile", prompt="hello", max_tokens=4000, temperature=0, stream=True
        )
        events = stream.__aiter__()
        await asyncio.wait_for(events.__anext__(), 30)
        world.replicas.engine(replica).kill()
        transport.gate.set()
        with pytest.raises(openai.APIError) as broken:
            async for _ in events:
                pass
        assert broken.value.code == "bad_gateway"
        assert f"replica {replica}" in broken.value.message
        partial = world.usage.records[-1]
        assert partial.deployment == "d-fragile" and partial.completion_tokens >= 1

        # The dead replica is started again for the next request.
        after = await api.completions.create(model="fragile", prompt="hi", max_tokens=3)
    assert after.choices[0].text is not None
    assert world.replicas.wakes == [replica]


async def test_a_client_that_leaves_cancels_its_upstream_request(world: World) -> None:
    deployment = world.deploy(Deployment(id="d-long", org="acme", name="long", concurrency=1))
    world.replicas.parallel, world.replicas.context = 1, 8192
    replica = world.replicas.add(deployment, started=True)
    transport = GatedTransport()
    gateway = world.gateway(transport=transport)
    async with serving(gateway) as url:
        stream = await client(url).completions.create(
            model="long", prompt="hello", max_tokens=8000, temperature=0, stream=True
        )
        await asyncio.wait_for(stream.__aiter__().__anext__(), 30)
        await stream.close()
        await until(lambda: transport.held == 0, "the gateway to drop the upstream request")
        await until(lambda: not gateway.pool(deployment).in_flight(), "the lease to be released")
        engine = world.replicas.engine(replica)
        async with httpx.AsyncClient(base_url=str(engine.address)) as direct:

            async def metrics() -> dict[str, float]:
                text = (await direct.get("/metrics")).text
                pairs = (line.split() for line in text.splitlines() if line[:1] not in "#")
                return {name: float(value) for name, value in pairs}

            counters = await metrics()
            for _ in range(3000):
                if counters["llamacpp:requests_processing"] == 0:
                    break
                await asyncio.sleep(0.01)
                counters = await metrics()
    assert counters["llamacpp:requests_processing"] == 0, "the engine kept on for nobody"
    assert 0 < counters["llamacpp:tokens_predicted_total"] < 4000


async def test_scale_from_zero_and_back(world: World) -> None:
    clock = ManualClock()
    deployment = world.deploy(Deployment(id="d-zero", org="acme", name="zero", max_replicas=1))
    replica = world.replicas.add(deployment, started=False)
    config = GatewayConfig(
        reconcile_interval_s=1.0, pool=PoolPolicy(idle_s=30.0, health_interval_s=0.05)
    )
    gateway = world.gateway(config, clock=clock)

    def state() -> ReplicaState:
        return world.replicas.replica(replica, deployment.id).state

    async with serving(gateway) as url:
        api = client(url)
        assert state() is ReplicaState.STOPPED
        cold = await pumping(
            clock, api.completions.create(model="zero", prompt="hi", max_tokens=4, temperature=0)
        )
        assert cold.choices and world.replicas.wakes == [replica]
        assert state() is ReplicaState.STARTED

        await gateway.reconcile()
        assert world.replicas.sleeps == [], "not idle long enough yet"
        clock.advance(31.0)
        await until(lambda: world.replicas.sleeps == [replica], "the idle replica to be suspended")
        assert state() is ReplicaState.SUSPENDED

        warm = await pumping(
            clock, api.completions.create(model="zero", prompt="hi", max_tokens=4, temperature=0)
        )
        assert warm.choices[0].text == cold.choices[0].text
        assert world.replicas.wakes == [replica, replica]
        assert state() is ReplicaState.STARTED
        clock.advance(31.0)
        await until(lambda: len(world.replicas.sleeps) == 2, "it to be suspended again")


async def test_scale_out_when_requests_queue_and_back_in_to_min(world: World) -> None:
    deployment = world.deploy(
        Deployment(id="d-burst", org="acme", name="burst", min_replicas=1, max_replicas=2)
    )
    deployment_one_at_a_time = Deployment(**{**deployment.__dict__, "concurrency": 1})
    world.deployments.deployments[-1] = deployment_one_at_a_time
    first = world.replicas.add(deployment, started=True)
    transport = GatedTransport()
    config = GatewayConfig(reconcile_interval_s=0, pool=PoolPolicy(queue_threshold=0, idle_s=0))
    gateway = world.gateway(config, transport=transport)
    async with serving(gateway) as url:
        api = client(url)

        async def streamed() -> str:
            stream = await api.completions.create(
                model="burst", prompt="hi", max_tokens=8, temperature=0, stream=True
            )
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        one = asyncio.create_task(streamed())
        await until(lambda: transport.held == 1, "the first stream to hold its replica")
        two = asyncio.create_task(streamed())
        await until(lambda: transport.held == 2, "the second stream on a new replica")
        pool = gateway.pool(deployment_one_at_a_time)
        [added] = [r for r in pool.in_flight() if r != first]
        assert pool.in_flight() == {first: 1, added: 1}
        assert world.replicas.scale_outs == 1 and world.replicas.wakes == [added]
        transport.gate.set()
        assert await one == await two

        await gateway.reconcile()
    assert len(world.replicas.sleeps) == 1, "scaled in to min_replicas=1, not below"


async def test_no_capacity_is_503_with_retry_after(world: World) -> None:
    world.deploy(Deployment(id="d-none", org="acme", name="none", max_replicas=0))
    world.deploy(Deployment(id="d-full", org="acme", name="full", max_replicas=3))
    world.replicas.room = 0
    async with serving(world.gateway()) as url, httpx.AsyncClient(base_url=url) as raw:
        auth = {"authorization": "Bearer tok-acme"}
        body = {"prompt": "hi", "max_tokens": 2}
        none = await raw.post("/completions", json={"model": "none", **body}, headers=auth)
        full = await raw.post("/completions", json={"model": "full", **body}, headers=auth)
    for response in (none, full):
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "server_error"
    assert "no room" in full.json()["error"]["message"]


async def test_a_full_queue_is_503_and_a_long_wait_times_out(world: World) -> None:
    clock = ManualClock()
    deployment = world.deploy(
        Deployment(id="d-busy", org="acme", name="busy", max_replicas=1, concurrency=1)
    )
    world.replicas.add(deployment, started=True)
    transport = GatedTransport()
    policy = PoolPolicy(max_queue=1, queue_timeout_s=60.0, health_interval_s=0.05)
    gateway = world.gateway(
        GatewayConfig(reconcile_interval_s=0, pool=policy), clock=clock, transport=transport
    )
    async with serving(gateway) as url:
        api = client(url)
        held = await pumping(
            clock,
            api.completions.create(model="busy", prompt="hi", max_tokens=4, stream=True),
        )
        await until(lambda: transport.held == 1, "the first request to hold the replica")
        waiting = asyncio.create_task(api.completions.create(model="busy", prompt="hi"))
        await until(lambda: gateway.pool(deployment).waiting == 1, "the second to queue")
        with pytest.raises(openai.InternalServerError) as full:
            await api.completions.create(model="busy", prompt="hi")
        assert full.value.status_code == 503
        assert full.value.response.headers["retry-after"] == "5"
        clock.advance(61.0)
        with pytest.raises(openai.InternalServerError) as late:
            await waiting
        assert late.value.status_code == 503 and "in time" in late.value.message
        transport.gate.set()
        assert [chunk async for chunk in held]
