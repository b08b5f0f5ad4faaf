"""What the etcd claim store does beyond the shared contract: round trips it saves, writes whose
answer was lost, and the watch-fed snapshot."""

from __future__ import annotations

from typing import Any

from hangar.scheduler import Claim
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.host_claims import host_state_to_json
from tests.scheduler.fleet import general_host

WAIT_S = 10.0


class CountingClient(EtcdClient):
    """A real client that counts its requests to etcd."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints, timeout_s=5.0)
        self.requests: list[str] = []

    def call(self, path: str, body: dict[str, Any], **options: Any) -> dict[str, Any]:
        self.requests.append(path)
        return super().call(path, body, **options)


def test_a_loser_gets_the_winners_state_without_another_round_trip(
    etcd_cluster: LocalEtcdCluster, etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    winner = EtcdClaimStore(etcd_client, etcd_layout)
    first = winner.put_host(general_host("cpu-1"))
    won = first.state.with_claim(Claim("m-winner", 1000, 512))
    assert winner.compare_and_set("cpu-1", 1, won)
    client = CountingClient(etcd_cluster.endpoints)
    loser = EtcdClaimStore(client, etcd_layout)
    assert not loser.compare_and_set("cpu-1", 1, first.state.with_claim(Claim("m", 1, 1)))
    assert loser.lost_writes == 1
    sent = len(client.requests)
    fresh = loser.read_host("cpu-1")
    assert len(client.requests) == sent, "read back by the losing transaction"
    assert fresh is not None and fresh.version == 2 and fresh.state == won
    assert loser.read_host("cpu-1") == fresh and len(client.requests) == sent + 1
    client.close()


def test_a_write_whose_answer_was_lost_counts_as_won(
    etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    store = EtcdClaimStore(etcd_client, etcd_layout)
    record = store.put_host(general_host("cpu-1"))
    mine = record.state.with_claim(Claim("m1", 1000, 512))
    # The first attempt committed, but its answer never came back; the client sends it again.
    etcd_client.put(etcd_layout.claim("cpu-1"), host_state_to_json(mine).encode())
    assert store.compare_and_set("cpu-1", 1, mine)
    assert store.lost_writes == 0
    other = record.state.with_claim(Claim("m2", 1000, 512))
    assert not store.compare_and_set("cpu-1", 1, other), "someone else's write still loses"


def test_a_batch_with_one_stale_host_writes_the_others_in_a_second_round(
    etcd_cluster: LocalEtcdCluster, etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    setup = EtcdClaimStore(etcd_client, etcd_layout)
    records = [setup.put_host(general_host(f"cpu-{n}")) for n in range(4)]
    assert setup.compare_and_set(
        "cpu-2", 1, records[2].state.with_claim(Claim("elsewhere", 1000, 512))
    )
    client = CountingClient(etcd_cluster.endpoints)
    store = EtcdClaimStore(client, etcd_layout)
    writes = [
        (f"cpu-{n}", 1, record.state.with_claim(Claim(f"m{n}", 1000, 512)))
        for n, record in enumerate(records)
    ]
    assert store.compare_and_set_many(writes) == [True, True, False, True]
    assert client.requests == ["/v3/kv/txn", "/v3/kv/txn"]
    snapshot = store.snapshot()
    assert [snapshot[f"cpu-{n}"].version for n in range(4)] == [2, 2, 2, 2]
    assert [c.machine_id for c in snapshot["cpu-2"].state.claims] == ["elsewhere"]
    client.close()


def test_the_started_store_snapshots_from_memory_and_sees_other_writers(
    etcd_cluster: LocalEtcdCluster, etcd_client: EtcdClient, etcd_layout: KeyLayout
) -> None:
    other = EtcdClaimStore(etcd_client, etcd_layout)
    other.put_host(general_host("cpu-1"))
    client = CountingClient(etcd_cluster.endpoints)
    with EtcdClaimStore(client, etcd_layout) as store:
        sent = len(client.requests)
        for _ in range(5):
            assert sorted(store.snapshot()) == ["cpu-1"]
        assert len(client.requests) == sent, "snapshots come from the cache"
        added = other.put_host(general_host("cpu-2"))
        assert store.cache.wait_until(lambda: "cpu-2" in store.snapshot(), WAIT_S)
        assert store.snapshot()["cpu-2"] == added
        assert other.remove_host("cpu-2", 1)
        assert not other.remove_host("cpu-1", 7), "a host that moved on is not removed"
        assert store.cache.wait_until(lambda: "cpu-2" not in store.snapshot(), WAIT_S)
    client.close()
