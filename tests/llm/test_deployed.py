"""A model deployed into a real guest and called as OpenAI is called.

A real server in this process (its agent boots QEMU guests on a private network of its own),
the engine image hangar builds over the tiny GGUF model, and the official ``openai`` client
pointed at the gateway ``hangar server`` runs. One replica is booted from zero by the first
request and shared by the assertions after it; then it is stopped and the next request
starts it again. A second org's token cannot see or call the model; a per-deployment key
reaches that model only; the tokens served are metered per org and deployment.
"""

from __future__ import annotations

import time
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hangar.api.services.llm import MachineReplicas, gateway_deployment
from hangar.llm.seams import ReplicaState
from hangar.llm.tinymodel import write_tiny_model
from tests.agent.helpers import machine_path, run_machine, wait_state
from tests.api.conftest import create_token
from tests.conftest import kill_vmms_under
from tests.fixtures.inprocess import InProcessServer

pytestmark = pytest.mark.slow

ORG, RIVAL, MODEL = "acme", "rival", "tiny"
DEPLOYMENTS = f"/v1/orgs/{ORG}/llm/deployments"
FROM_ZERO_TIMEOUT_S = 300.0
PROMPT = [{"role": "user", "content": "hello"}]
SLEEPING = ReplicaState.SUSPENDED  # what an idle replica is put into


@dataclass
class Deployed:
    server: InProcessServer
    api: httpx.Client
    base_url: str
    org_token: str
    rival_token: str
    first_answer: Any
    first_answer_s: float

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=token or self.org_token,
            timeout=FROM_ZERO_TIMEOUT_S,
            max_retries=0,
        )

    def deployment(self) -> dict[str, Any]:
        response = self.api.get(f"{DEPLOYMENTS}/{MODEL}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    home = tmp_path_factory.mktemp("llm-deployed")
    model = write_tiny_model(home / "models" / "tiny.gguf")
    try:
        with InProcessServer(home) as server, server.client() as api:
            for org in (ORG, RIVAL):
                assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
            org_token = create_token(api, org_slug=ORG)
            rival_token = create_token(api, org_slug=RIVAL)
            created = api.post(
                DEPLOYMENTS,
                json={"name": MODEL, "model": str(model), "memory_mb": 512, "max_replicas": 1},
                timeout=900,
            )
            assert created.status_code == 201, created.text
            assert created.json()["replicas"] == [], "min 0: nothing runs before a request"
            gateway = server.embedded.traffic.gateway
            assert gateway is not None
            world = Deployed(server, api, gateway.url, org_token, rival_token, None, 0.0)
            started = time.monotonic()
            world.first_answer = world.client().chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, seed=1
            )
            world.first_answer_s = time.monotonic() - started
            yield world
            assert api.delete(f"{DEPLOYMENTS}/{MODEL}").status_code == 204
    finally:
        kill_vmms_under(home)


def test_the_first_request_boots_a_replica_from_zero(deployed: Deployed) -> None:
    answer = deployed.first_answer
    assert answer.object == "chat.completion"
    assert answer.model == MODEL
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    replicas = deployed.deployment()["replicas"]
    assert [r["state"] for r in replicas] == ["started"]
    assert replicas[0]["private_ip"], "the replica is a machine on the org's private network"
    print(f"first token from zero (create + boot + load): {deployed.first_answer_s:.1f} s")


def test_chat_stream_completions_embeddings_and_models(deployed: Deployed) -> None:
    client = deployed.client()
    again = client.chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, seed=1
    )
    assert again.choices[0].message.content == deployed.first_answer.choices[0].message.content

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, seed=1, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text == again.choices[0].message.content
    assert all(c.usage is None for c in chunks), "usage only when the client asks for it"

    completion = client.completions.create(model=MODEL, prompt="once upon", max_tokens=4)
    assert completion.object == "text_completion" and completion.usage.completion_tokens > 0

    embedding = client.embeddings.create(model=MODEL, input=["a", "b c"])
    assert len(embedding.data) == 2
    assert len(embedding.data[0].embedding) == len(embedding.data[1].embedding) > 0

    assert [m.id for m in client.models.list()] == [MODEL]


def test_another_org_cannot_reach_the_model(deployed: Deployed) -> None:
    rival = deployed.client(deployed.rival_token)
    assert [m.id for m in rival.models.list()] == []
    with pytest.raises(openai.NotFoundError) as refused:
        rival.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as absent:
        rival.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=2)
    assert refused.value.code == absent.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        deployed.client("hgr_" + "x" * 43).models.list()
    listing = deployed.server.client(deployed.rival_token).get(DEPLOYMENTS)
    assert listing.status_code == 404, "the rival's token does not see the org's deployments"


def test_a_deployment_key_reaches_its_model_only(deployed: Deployed) -> None:
    created = deployed.api.post(f"{DEPLOYMENTS}/{MODEL}/keys")
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    client = deployed.client(key)
    assert [m.id for m in client.models.list()] == [MODEL]
    answer = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert answer.usage.completion_tokens > 0


def test_tokens_are_metered_per_org_and_deployment(deployed: Deployed) -> None:
    client = deployed.client()
    before = deployed.deployment()["usage"]
    answer = client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    after = deployed.deployment()["usage"]
    assert after["requests"] == before["requests"] + 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == answer.usage.prompt_tokens
    assert (
        after["completion_tokens"] - before["completion_tokens"] == answer.usage.completion_tokens
    )
    rival = deployed.server.embedded.stores.llm.token_totals(RIVAL)
    assert rival.requests == 0
    report = deployed.api.get(f"/v1/orgs/{ORG}/usage").json()
    (model,) = [m for m in report["models"] if m["name"] == MODEL]
    assert (model["requests"], model["prompt_tokens"], model["completion_tokens"]) == (
        after["requests"],
        after["prompt_tokens"],
        after["completion_tokens"],
    )
    assert deployed.api.get(f"/v1/orgs/{RIVAL}/usage").json()["models"] == []


def test_a_stopped_replica_is_started_by_the_next_request(deployed: Deployed) -> None:
    app = deployed.deployment()["app"]
    (replica,) = deployed.deployment()["replicas"]
    stopped = deployed.api.post(machine_path(app, replica["id"]) + "/stop", json={})
    assert stopped.status_code == 200, stopped.text
    wait_state(deployed.api, app, replica["id"], "stopped")
    started = time.monotonic()
    answer = deployed.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, seed=1
    )
    waking_s = time.monotonic() - started
    assert answer.choices[0].message.content == deployed.first_answer.choices[0].message.content
    assert [r["state"] for r in deployed.deployment()["replicas"]] == ["started"]
    assert [r["id"] for r in deployed.deployment()["replicas"]] == [replica["id"]]
    print(f"first token from a stopped replica: {waking_s:.1f} s")


def test_a_replica_put_to_sleep_is_woken_by_the_next_request(deployed: Deployed) -> None:
    """What the gateway does to an idle replica (``Replicas.sleep``), then a request."""
    server = deployed.server
    llm = server.embedded.llm
    record = server.embedded.stores.llm.deployment_named(ORG, MODEL)
    assert record is not None
    (machine,) = llm.replicas(record)
    replicas = MachineReplicas(llm)
    (replica,) = server.call(replicas.list(gateway_deployment(record)))
    assert replica.state is ReplicaState.STARTED
    server.call(replicas.sleep(replica))
    (asleep,) = server.call(replicas.list(gateway_deployment(record)))
    assert asleep.state is SLEEPING
    started = time.monotonic()
    answer = deployed.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, temperature=0, seed=1
    )
    print(f"first token from a replica put to sleep: {time.monotonic() - started:.1f} s")
    assert answer.choices[0].message.content == deployed.first_answer.choices[0].message.content
    assert [r["id"] for r in deployed.deployment()["replicas"]] == [machine.id]


def test_list_and_scale(deployed: Deployed) -> None:
    listing = deployed.api.get(DEPLOYMENTS)
    assert [d["name"] for d in listing.json()] == [MODEL]
    scaled = deployed.api.post(f"{DEPLOYMENTS}/{MODEL}/scale", json={"max_replicas": 2})
    assert scaled.status_code == 200, scaled.text
    assert (scaled.json()["min_replicas"], scaled.json()["max_replicas"]) == (0, 2)
    bad = deployed.api.post(f"{DEPLOYMENTS}/{MODEL}/scale", json={"min_replicas": 3})
    assert bad.status_code == 400 and "min_replicas" in bad.text


def test_weights_on_a_volume_reach_each_replica_as_a_copy_of_a_snapshot(
    deployed: Deployed, test_image: str
) -> None:
    api, app, name = deployed.api, "weights", "tiny-vol"
    assert api.post("/v1/apps", json={"app_name": app, "org_slug": ORG}).status_code == 201
    volume = api.post(f"/v1/apps/{app}/volumes", json={"name": "weights", "encrypted": False})
    assert volume.status_code == 200, volume.text
    volume_id = volume.json()["id"]
    model = write_tiny_model(deployed.server.home / "vol-model" / "tiny.gguf")
    loader = run_machine(
        api,
        app,
        test_image,
        ["sh", "-c", "cp /seed/tiny.gguf /models/tiny.gguf && sync"],
        files=[{"guest_path": "/seed/tiny.gguf", "raw_value": base64(model)}],
        mounts=[{"volume": volume_id, "path": "/models"}],
    )
    wait_state(api, app, loader, "stopped")
    created = api.post(
        DEPLOYMENTS,
        json={"name": name, "model": "vol:weights:tiny.gguf", "app_name": app, "memory_mb": 512},
    )
    assert created.status_code == 201, created.text
    assert created.json()["model"] == "vol:weights:tiny.gguf"
    answer = deployed.client().completions.create(model=name, prompt="hi", max_tokens=2)
    assert answer.usage.completion_tokens > 0
    (replica,) = api.get(f"{DEPLOYMENTS}/{name}").json()["replicas"]
    machine = api.get(machine_path(app, replica["id"])).json()
    (mount,) = machine["config"]["mounts"]
    copy = api.get(f"/v1/apps/{app}/volumes/{mount['volume']}").json()
    assert mount["volume"] != volume_id and mount["path"] == "/models"
    assert copy["snapshot_id"], "the replica's weights were restored from a snapshot"
    assert api.delete(f"{DEPLOYMENTS}/{name}").status_code == 204
    gone = api.get(f"/v1/apps/{app}/volumes/{mount['volume']}").json()
    assert gone["state"] in ("destroyed", "pending_destroy"), gone


def base64(path: Path) -> str:
    return b64encode(path.read_bytes()).decode()
