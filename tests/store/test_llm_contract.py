"""The LlmStore contract, over a real SQLite file and a real etcd: deployments unique per org,
keys found by hash only, token totals per org and deployment and over windows to the second."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hangar.errors import Conflict
from hangar.model.llm import ApiKey, Deployment, Engine, ModelSource, TokenTotals, TokenUsage
from hangar.store.etcd.llm import HOUR_S, RAW_RETENTION_S, EtcdLlmStore
from hangar.store.llm import LlmStore, SqliteLlmStore
from tests.fixtures.etcd import StoreScratch

LLM_BACKENDS: dict[str, Callable[[StoreScratch], LlmStore]] = {
    "sqlite": lambda scratch: SqliteLlmStore(scratch.tmp / "hangar.db"),
    "etcd": lambda scratch: EtcdLlmStore(scratch.etcd_client(), scratch.sealer, scratch.layout),
}


@pytest.fixture(params=sorted(LLM_BACKENDS))
def store(request: pytest.FixtureRequest, store_scratch: StoreScratch) -> LlmStore:
    return LLM_BACKENDS[request.param](store_scratch)


def used(deployment: str, at: float, prompt: int = 1, completion: int = 0) -> TokenUsage:
    return TokenUsage(
        org="acme",
        deployment=deployment,
        token_id="tok_1",
        endpoint="completions",
        prompt_tokens=prompt,
        completion_tokens=completion,
        at=at,
    )


def deployment(org: str, name: str, deployment_id: str) -> Deployment:
    return Deployment(
        id=deployment_id,
        org=org,
        name=name,
        app=f"llm-{name}",
        model=ModelSource.parse("vol:weights:tiny.gguf"),
        engine=Engine.LLAMA_CPP,
        image="oci:/x:y",
        port=8080,
        cpus=1,
        memory_mb=512,
        min_replicas=0,
        max_replicas=2,
        concurrency=4,
        context=2048,
        region="local",
        created_at=1.0,
    )


def test_deployments_keys_and_token_totals(store: LlmStore) -> None:
    store.insert_deployment(deployment("acme", "tiny", "dep_1"))
    store.insert_deployment(deployment("rival", "tiny", "dep_2"))
    with pytest.raises(Conflict, match="already has a deployment named tiny"):
        store.insert_deployment(deployment("acme", "tiny", "dep_3"))
    assert store.get_deployment("dep_3") is None
    assert [d.id for d in store.list_deployments("acme")] == ["dep_1"]
    assert [d.id for d in store.list_deployments()] == ["dep_1", "dep_2"]
    found = store.deployment_named("rival", "tiny")
    assert found is not None and found.model.volume == "weights"
    store.save_deployment(found.model_copy(update={"max_replicas": 4}))
    assert store.deployment_named("rival", "tiny").max_replicas == 4  # type: ignore[union-attr]

    key = ApiKey(id="key_1", org="acme", deployment="dep_1", created_at=2.0)
    store.insert_key(key, "hash-of-secret")
    assert store.key_by_hash("hash-of-secret") == key
    assert store.key_by_hash("secret") is None

    for prompt, completion in ((5, 3), (7, 0)):
        store.record_tokens(
            TokenUsage(
                org="acme",
                deployment="dep_1",
                token_id="tok_1",
                endpoint="completions",
                prompt_tokens=prompt,
                completion_tokens=completion,
                at=3.0,
            )
        )
    totals = store.token_totals("acme", "dep_1")
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (2, 12, 3)
    assert store.token_totals("rival").requests == 0
    by_deployment = store.tokens_by_deployment("acme", 0.0, 10.0)
    assert by_deployment["dep_1"] == totals
    assert store.tokens_by_deployment("acme", 3.5, 10.0) == {}, "outside the window"

    store.delete_deployment("dep_1")
    assert store.get_deployment("dep_1") is None
    assert store.key_by_hash("hash-of-secret") is None, "a deployment's keys go with it"
    assert store.token_totals("acme", "dep_1") == totals, "what was served stays counted"
    store.insert_deployment(deployment("acme", "tiny", "dep_4"))
    assert store.deployment_named("acme", "tiny").id == "dep_4"  # type: ignore[union-attr]


def test_windows_count_to_the_second_across_hours(store: LlmStore) -> None:
    base = 1000 * HOUR_S
    for deployment, at in [
        ("dep_a", base + 10.0),
        ("dep_a", base + HOUR_S - 1.0),
        ("dep_a", base + 2 * HOUR_S + 5.0),
        ("dep_b", base + HOUR_S + 30.0),
        ("dep_b", base + 3 * HOUR_S),
    ]:
        store.record_tokens(used(deployment, at, prompt=2, completion=1))
    store.record_tokens(used("dep_c", base, prompt=9).model_copy(update={"org": "rival"}))

    def requests(since: float, until: float) -> dict[str, int]:
        found = store.tokens_by_deployment("acme", since, until)
        return {deployment: totals.requests for deployment, totals in found.items()}

    assert requests(base, base + 4 * HOUR_S) == {"dep_a": 3, "dep_b": 2}
    assert requests(base + 11.0, base + 3 * HOUR_S) == {"dep_a": 2, "dep_b": 1}
    assert requests(base + 10.0, base + 10.5) == {"dep_a": 1}
    assert requests(base + HOUR_S, base + 2 * HOUR_S) == {"dep_b": 1}
    assert requests(base + 3 * HOUR_S + 1, base + 9 * HOUR_S) == {}
    full = store.tokens_by_deployment("acme", 0.0, base + 4 * HOUR_S)["dep_a"]
    assert full == TokenTotals(requests=3, prompt_tokens=6, completion_tokens=3)
    assert store.token_totals("acme") == TokenTotals(
        requests=5, prompt_tokens=10, completion_tokens=5
    )
    assert store.token_totals("rival").prompt_tokens == 9


def test_etcd_keeps_requests_only_for_a_while_and_counts_old_hours_pro_rata(
    store_scratch: StoreScratch,
) -> None:
    client = store_scratch.etcd_client()
    store = EtcdLlmStore(client, store_scratch.sealer, store_scratch.layout)
    old = 1000 * HOUR_S
    for minute in range(4):
        store.record_tokens(used("dep_a", old + 60.0 * minute, prompt=10))
    assert store.tokens_by_deployment("acme", old + 61.0, old + HOUR_S)["dep_a"].requests == 2
    # A request far later prunes the old hour's records; its counters stay.
    store.record_tokens(used("dep_a", old + RAW_RETENTION_S + 2 * HOUR_S))
    records = client.range_prefix(f"{store_scratch.layout.prefix}/llm-token-records/").kvs
    assert len(records) == 1
    half = store.tokens_by_deployment("acme", old + HOUR_S / 2, old + HOUR_S)["dep_a"]
    assert (half.requests, half.prompt_tokens) == (2, 20)
    assert store.token_totals("acme", "dep_a").requests == 5


def test_etcd_holds_no_key_hash_in_clear(store_scratch: StoreScratch) -> None:
    client = store_scratch.etcd_client()
    store = EtcdLlmStore(client, store_scratch.sealer, store_scratch.layout)
    store.insert_deployment(deployment("acme", "tiny", "dep_1"))
    store.insert_key(ApiKey(id="key_1", org="acme", deployment="dep_1", created_at=1.0), "ab12cd")
    stored = b"".join(
        kv.key.encode() + kv.value for kv in client.range_prefix(store_scratch.layout.prefix).kvs
    )
    assert b"ab12cd" not in stored
    other = EtcdLlmStore(client, store_scratch.sealer, store_scratch.layout)
    assert other.key_by_hash("ab12cd") is not None, "another replica finds it"


def test_model_sources() -> None:
    assert ModelSource.parse("vol:w") == ModelSource(volume="w", file="model.gguf")
    assert str(ModelSource.parse("vol:w:m.gguf")) == "vol:w:m.gguf"
    assert ModelSource.parse("/srv/m.gguf").file == "m.gguf"
    with pytest.raises(Exception, match="absolute"):
        ModelSource.parse("m.gguf")
    with pytest.raises(Exception, match="plain file name"):
        ModelSource.parse("vol:w:../etc/passwd")
