"""What the etcd stores add over the shared contracts: token hashes never stored in clear,
racing replicas on one name or one machine (exactly one wins, no write lost), and a write
refused whole while etcd has no quorum."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from hangar.errors import Conflict, StoreUnavailable
from hangar.model.config import MachineConfig
from hangar.model.machine import Machine, MachineState
from hangar.model.services import CheckStatus
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.etcd.machines import EtcdMachineStore
from hangar.store.etcd.sealed import KEY_BYTES, Sealer
from hangar.store.etcd.tenancy import EtcdTenancyStore
from hangar.store.protocol import ApiToken, TokenKind
from tests.fixtures.etcd import StoreScratch

RACERS = 6
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def machine(machine_id: str, name: str) -> Machine:
    return Machine(
        id=machine_id,
        name=name,
        app="web",
        state=MachineState.CREATED,
        region="local",
        instance_id="i1",
        version=1,
        config=MachineConfig(image="x"),
        created_at=1.0,
        updated_at=1.0,
    )


def race(count: int, act: Callable[[int], None]) -> list[BaseException | None]:
    outcomes: list[BaseException | None] = [None] * count
    barrier = threading.Barrier(count)

    def run(number: int) -> None:
        barrier.wait(timeout=10)
        try:
            act(number)
        except BaseException as error:  # recorded for the assertions
            outcomes[number] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def test_token_hashes_and_secrets_are_never_in_clear(store_scratch: StoreScratch) -> None:
    client = store_scratch.etcd_client()
    store = EtcdTenancyStore(client, store_scratch.sealer, store_scratch.layout)
    secret_hash = "f00d" * 16
    token = ApiToken(id="tok_sealed", kind=TokenKind.ORG, org_slug="acme", created_at=1.0)
    store.insert_token(token, secret_hash)
    assert store.token_by_hash(secret_hash) == token
    everything = client.range_prefix(store_scratch.layout.prefix + "/").kvs
    assert everything, "the store wrote nothing"
    for kv in everything:
        assert secret_hash not in kv.key and secret_hash.encode() not in kv.value
    # another fleet's key opens nothing, and finds nothing
    stranger = Sealer([b"\x01" * KEY_BYTES])
    assert (
        EtcdTenancyStore(client, stranger, store_scratch.layout).token_by_hash(secret_hash) is None
    )


def test_replicas_racing_for_one_name_exactly_one_wins(store_scratch: StoreScratch) -> None:
    stores = [
        EtcdMachineStore(store_scratch.etcd_client(), store_scratch.layout) for _ in range(RACERS)
    ]
    outcomes = race(RACERS, lambda n: stores[n].insert_machine(machine(f"m{n}", "same")))
    assert sum(outcome is None for outcome in outcomes) == 1
    assert all(isinstance(o, Conflict) for o in outcomes if o is not None)
    assert len(stores[0].list_machines("web")) == 1


def test_concurrent_field_writes_lose_nothing(store_scratch: StoreScratch) -> None:
    stores = [
        EtcdMachineStore(store_scratch.etcd_client(), store_scratch.layout) for _ in range(RACERS)
    ]
    stores[0].insert_machine(machine("m1", "one"))

    def act(number: int) -> None:
        if number % 2:
            stores[number].set_checks(
                "m1", [CheckStatus(name=f"c{number}", status="passing", updated_at=NOW)]
            )
        else:
            stores[number].set_state("m1", MachineState.STARTING, 2.0 + number)

    assert race(RACERS, act) == [None] * RACERS
    final = stores[0].get_machine("m1")
    assert final is not None
    assert final.state is MachineState.STARTING and len(final.checks) == 1


def test_without_quorum_a_write_is_refused_whole(own_etcd_cluster: LocalEtcdCluster) -> None:
    layout = KeyLayout("/quorum")
    client = EtcdClient(own_etcd_cluster.endpoints, timeout_s=2.0)
    try:
        store = EtcdMachineStore(client, layout)
        store.insert_machine(machine("m1", "one"))
        own_etcd_cluster.stop_member(1)
        own_etcd_cluster.stop_member(2)
        with pytest.raises(StoreUnavailable):
            store.set_state("m1", MachineState.DESTROYED, 3.0)
        own_etcd_cluster.start_member(1)
        own_etcd_cluster.start_member(2)
        own_etcd_cluster.wait_healthy()
        back = store.get_machine("m1")
        assert back is not None and back.state is MachineState.CREATED
        with pytest.raises(Conflict):  # the name was not freed by the refused destroy
            store.insert_machine(machine("m2", "one"))
    finally:
        client.close()


def test_only_the_newest_config_versions_are_kept(store_scratch: StoreScratch) -> None:
    store = EtcdMachineStore(store_scratch.etcd_client(), store_scratch.layout, keep_versions=3)
    store.insert_machine(machine("m1", "one"))
    for version in range(2, 9):
        store.apply_config_version("m1", MachineConfig(image=f"v{version}"), version, "i", 1.0)
    versions = store.list_config_versions("m1")
    assert [v["version"] for v in versions] == [6, 7, 8]
    assert [v["replaced_at"] is None for v in versions] == [False, False, True]
