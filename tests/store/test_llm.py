"""The LLM store on a real SQLite file: deployments unique per org, keys found by hash only,
token totals per org and deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from hangar.errors import Conflict
from hangar.model.llm import ApiKey, Deployment, Engine, ModelSource, TokenUsage
from hangar.store.llm import SqliteLlmStore


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


def test_deployments_keys_and_token_totals(tmp_path: Path) -> None:
    store = SqliteLlmStore(tmp_path / "hangar.db")
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
    store.close()


def test_model_sources() -> None:
    assert ModelSource.parse("vol:w") == ModelSource(volume="w", file="model.gguf")
    assert str(ModelSource.parse("vol:w:m.gguf")) == "vol:w:m.gguf"
    assert ModelSource.parse("/srv/m.gguf").file == "m.gguf"
    with pytest.raises(Exception, match="absolute"):
        ModelSource.parse("m.gguf")
    with pytest.raises(Exception, match="plain file name"):
        ModelSource.parse("vol:w:../etc/passwd")
