"""One contract per store protocol, run over every implementation of it: a new backend (the
fleet's etcd store) joins by adding one entry to a ``*_BACKENDS`` list."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hangar.agent.steps import new_run
from hangar.errors import Conflict, NotFound
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.footprint import Footprint
from hangar.model.gpu import GpuEvent, GpuRecord
from hangar.model.machine import Lease, Machine, MachineState, host_event
from hangar.model.run import RunStatus, StartRequest, StopRequest
from hangar.store.etcd.machines import EtcdMachineStore
from hangar.store.gpus import SqliteGpuStore
from hangar.store.machines import SqliteMachineStore
from hangar.store.protocol import GpuStore, MachineStore, RunStore
from hangar.store.runs import SqliteRunStore
from tests.fixtures.etcd import StoreScratch

MACHINE_BACKENDS: dict[str, Callable[[StoreScratch], MachineStore]] = {
    "sqlite": lambda scratch: SqliteMachineStore(scratch.tmp / "db"),
    "etcd": lambda scratch: EtcdMachineStore(scratch.etcd_client(), scratch.layout),
}
RUN_BACKENDS: dict[str, Callable[[Path], RunStore]] = {
    "sqlite": lambda tmp: SqliteRunStore(tmp / "db"),
}
GPU_BACKENDS: dict[str, Callable[[Path], GpuStore]] = {
    "sqlite": lambda tmp: SqliteGpuStore(tmp / "db"),
}


@pytest.fixture(params=sorted(MACHINE_BACKENDS))
def machines(request: pytest.FixtureRequest, store_scratch: StoreScratch) -> MachineStore:
    return MACHINE_BACKENDS[request.param](store_scratch)


@pytest.fixture(params=sorted(RUN_BACKENDS))
def runs(request: pytest.FixtureRequest, tmp_path: Path) -> RunStore:
    return RUN_BACKENDS[request.param](tmp_path)


@pytest.fixture(params=sorted(GPU_BACKENDS))
def gpus(request: pytest.FixtureRequest, tmp_path: Path) -> GpuStore:
    return GPU_BACKENDS[request.param](tmp_path)


def machine(machine_id: str, app: str = "web", name: str = "") -> Machine:
    return Machine(
        id=machine_id,
        name=name or machine_id,
        app=app,
        state=MachineState.CREATED,
        region="local",
        instance_id="i1",
        version=1,
        config=MachineConfig(image="x"),
        created_at=1.0,
        updated_at=1.0,
    )


def test_apps(machines: MachineStore) -> None:
    machines.create_app("web", "acme", 1.0)
    with pytest.raises(Conflict):
        machines.create_app("web", "other", 2.0)
    machines.create_app("api", "beta", 3.0)
    assert [app.name for app in machines.list_apps(None)] == ["api", "web"]
    assert [app.name for app in machines.list_apps("acme")] == ["web"]
    machines.delete_app("web")
    assert machines.get_app("web") is None


def test_machines_states_names_and_versions(machines: MachineStore) -> None:
    machines.insert_machine(machine("m1", name="one"))
    with pytest.raises(Conflict):
        machines.insert_machine(machine("m2", name="one"))
    assert machines.set_state("m1", MachineState.DESTROYED, 2.0).state == MachineState.DESTROYED
    machines.insert_machine(machine("m2", name="one"))  # the name is free once destroyed
    assert [m.id for m in machines.list_machines("web")] == ["m2"]
    assert {m.id for m in machines.list_machines("web", include_destroyed=True)} == {"m1", "m2"}
    config = MachineConfig(image="y", metadata={"v": "2"})
    machines.apply_config_version("m2", config, 2, "i2", 3.0)
    updated = machines.get_machine("m2")
    assert updated is not None
    assert (updated.version, updated.instance_id, updated.config.image) == (2, "i2", "y")
    versions = machines.list_config_versions("m2")
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["replaced_at"] == 3.0 and versions[1]["replaced_at"] is None


def sized(
    machine_id: str, app: str, memory_mb: int = 256, gpus: int = 0, created_at: float = 1.0
) -> Machine:
    guest = GuestConfig(memory_mb=memory_mb)
    if gpus:
        guest = GuestConfig(cpu_kind="performance", memory_mb=memory_mb, gpu_kind="l40s", gpus=gpus)
    return machine(machine_id, app).model_copy(
        update={"config": MachineConfig(image="x", guest=guest), "created_at": created_at}
    )


def recount(machines: MachineStore, org: str) -> Footprint:
    """The org's usage the slow way: every machine of every app of the org."""
    total = Footprint()
    for app in machines.list_apps(org):
        for each in machines.list_machines(app.name):
            total.add(each.config)
    return total


def test_usage_counters_follow_every_machine_write(machines: MachineStore) -> None:
    machines.create_app("web", "acme", 1.0)
    machines.create_app("api", "acme", 1.0)
    machines.create_app("other", "beta", 1.0)

    def check(machines_: int, memory_mb: int, gpus: int) -> None:
        counted = machines.machine_usage("acme")
        assert counted == recount(machines, "acme")
        expected_gpus = {"l40s": gpus} if gpus else {}
        assert counted == Footprint(machines=machines_, memory_mb=memory_mb, gpus=expected_gpus)

    check(0, 0, 0)
    machines.insert_machine(sized("m1", "web", 512))
    machines.insert_machine(sized("m2", "api", 1024, gpus=2))
    machines.insert_machine(sized("m3", "other", 2048, gpus=1))
    check(2, 1536, 2)
    assert machines.machine_usage("beta") == Footprint(machines=1, memory_mb=2048, gpus={"l40s": 1})
    with pytest.raises(Conflict):  # a failed write counts nothing
        machines.insert_machine(sized("m4", "web", 4096).model_copy(update={"name": "m1"}))
    check(2, 1536, 2)

    machines.apply_config_version("m1", sized("m1", "web", 768, gpus=1).config, 2, "i2", 2.0)
    check(2, 1792, 3)
    with pytest.raises(NotFound):
        machines.apply_config_version("nope", sized("x", "web").config, 2, "i2", 2.0)
    machines.set_state("m1", MachineState.STARTED, 3.0)  # states short of destroyed: no change
    check(2, 1792, 3)
    machines.set_state("m2", MachineState.DESTROYED, 4.0)
    check(1, 768, 1)
    machines.set_state("m2", MachineState.DESTROYED, 4.5)  # twice: uncounted once
    check(1, 768, 1)
    with pytest.raises(NotFound):
        machines.set_state("nope", MachineState.DESTROYED, 5.0)

    saved = machines.get_machine("m1")
    assert saved is not None
    machines.save_machine(saved.model_copy(update={"config": sized("m1", "web", 128).config}))
    check(1, 128, 0)
    machines.save_machine(saved.model_copy(update={"state": MachineState.DESTROYED}))
    check(0, 0, 0)
    with pytest.raises(NotFound):
        machines.save_machine(sized("nope", "web"))

    machines.insert_machine(sized("m5", "web", 256))
    check(1, 256, 0)
    assert sorted(machines.delete_app("web", 6.0)) == ["m1", "m5"]  # records go, uncounted
    check(0, 0, 0)
    machines.create_app("web", "beta", 7.0)  # the name again, another org's app
    machines.insert_machine(sized("m6", "web", 512))
    check(0, 0, 0)
    assert machines.machine_usage("beta") == recount(machines, "beta")
    assert machines.machine_usage("beta").machines == 2
    assert machines.machine_usage("nobody") == Footprint()


def test_machines_page_oldest_first_after_a_cursor(machines: MachineStore) -> None:
    # Two machines created in the same instant are ordered by id.
    for machine_id, created_at in (("m3", 1.0), ("m1", 2.0), ("m2", 2.0), ("m0", 3.0)):
        machines.insert_machine(sized(machine_id, "web", created_at=created_at))
    machines.insert_machine(sized("elsewhere", "api", created_at=1.5))
    machines.set_state("m0", MachineState.DESTROYED, 4.0)
    whole = [m.id for m in machines.list_machines("web", include_destroyed=True)]
    assert whole == ["m3", "m1", "m2", "m0"]

    def page(limit: int, after: str | None, destroyed: bool = False) -> list[str]:
        found = machines.list_machines("web", destroyed, limit=limit, after=after)
        return [m.id for m in found]

    assert page(2, None) == ["m3", "m1"]
    assert page(2, "m1") == ["m2"]
    assert page(2, "m2") == []
    assert page(3, "m3", destroyed=True) == ["m1", "m2", "m0"]
    assert page(2, "unknown") == []


def test_an_update_keeps_the_metadata_edits_made_after_it_was_asked_for(
    machines: MachineStore,
) -> None:
    first = machine("m1")
    machines.insert_machine(
        first.model_copy(update={"config": MachineConfig(image="x", metadata={"a": "1", "b": "1"})})
    )
    before = {"a": "1", "b": "1"}
    # Asked for while the metadata was ``before``; applied after three edits through the
    # metadata endpoints: ``role`` set, ``a`` changed, ``b`` removed.
    asked = MachineConfig(image="y", metadata={"a": "1", "b": "1", "c": "update"})
    machines.update_metadata("m1", {"role": "w", "a": "2", "b": None}, 2.0)
    machines.apply_config_version("m1", asked, 2, "i2", 3.0, metadata_before=before)
    updated = machines.get_machine("m1")
    assert updated is not None and updated.config.image == "y"
    assert updated.config.metadata == {"a": "2", "c": "update", "role": "w"}
    [_, current] = machines.list_config_versions("m1")
    assert current["config"].metadata == updated.config.metadata
    # Without edits since, the update's metadata is taken as it is.
    plain = MachineConfig(image="z", metadata={"only": "this"})
    machines.apply_config_version(
        "m1", plain, 3, "i3", 4.0, metadata_before=updated.config.metadata
    )
    again = machines.get_machine("m1")
    assert again is not None and again.config.metadata == {"only": "this"}


def test_events_newest_first_and_leases(machines: MachineStore) -> None:
    machines.insert_machine(machine("m1"))
    for n in range(3):
        machines.add_event("m1", host_event("start", f"s{n}", float(n)))
    assert [e.status for e in machines.list_events("m1")] == ["s2", "s1", "s0"]
    assert [e.status for e in machines.list_events("m1", limit=1)] == ["s2"]
    lease = Lease(nonce="n", expires_at=10, owner="o", version="v")
    machines.put_lease("m1", lease)
    assert machines.get_lease("m1") == lease
    machines.delete_lease("m1")
    assert machines.get_lease("m1") is None


def test_runs_are_idempotent_ordered_and_typed(runs: RunStore) -> None:
    first = new_run("m1", StartRequest(), 1.0)
    second = new_run("m1", StopRequest(signal=2), 2.0)
    done = new_run("m1", StartRequest(), 0.5)
    done.status = RunStatus.SUCCEEDED
    for run in (second, done, first):
        assert runs.insert_run(run)
    assert not runs.insert_run(first)
    unfinished = runs.list_runs("m1", unfinished_only=True)
    assert [run.id for run in unfinished] == [first.id, second.id]
    assert unfinished[1].request == StopRequest(signal=2)
    first.status = RunStatus.FAILED
    runs.save_run(first)
    assert [run.id for run in runs.list_runs("m1", unfinished_only=True)] == [second.id]
    runs.put_vm_handle("m1", {"pid": 1})
    assert runs.list_vm_handles() == {"m1": {"pid": 1}}
    runs.delete_vm_handle("m1")
    assert runs.get_vm_handle("m1") is None


def test_gpu_inventory_keeps_binding_and_quarantine_reason(gpus: GpuStore) -> None:
    record = GpuRecord(host_id="h", bdf="0000:01:00.0", kind="l40s", reason="")
    gpus.upsert_gpu_inventory(record)
    gpus.save_gpu(record.model_copy(update={"binding": {"x": 1}, "quarantine_reason": "bad"}))
    again = gpus.upsert_gpu_inventory(record.model_copy(update={"numa_node": 1}))
    assert again.binding == {"x": 1} and again.quarantine_reason == "bad"
    assert again.numa_node == 1
    gpus.add_gpu_event(GpuEvent(bdf=record.bdf, timestamp=1.0, action="a", actor="t"))
    gpus.add_gpu_event(GpuEvent(bdf=record.bdf, timestamp=2.0, action="b", actor="t"))
    assert [e.action for e in gpus.list_gpu_events(record.bdf)] == ["b", "a"]
    assert [g.bdf for g in gpus.list_gpus(host_id="h")] == [record.bdf]


def test_deleting_an_app_deletes_its_machines_and_holds_its_name(machines: MachineStore) -> None:
    first = machines.create_app("web", "acme", 1.0)
    machines.insert_machine(machine("m1").model_copy(update={"app_id": first.id}))
    machines.add_event("m1", host_event("start", "s", 1.0))
    machines.put_lease("m1", Lease(nonce="n", expires_at=10, owner="o", version="v"))
    assert machines.delete_app("web", now=10.0) == ["m1"]
    assert machines.get_machine("m1") is None and machines.list_events("m1") == []
    assert machines.get_lease("m1") is None and machines.list_config_versions("m1") == []
    with pytest.raises(Conflict):
        machines.create_app("web", "rival", 20.0, name_hold_s=60.0)
    second = machines.create_app("web", "rival", 71.0, name_hold_s=60.0)
    assert second.id != first.id
    # A record of the earlier instance (written by a backend that scrubbed nothing) stays out.
    machines.insert_machine(machine("m2").model_copy(update={"app_id": first.id}))
    machines.insert_machine(machine("m3").model_copy(update={"app_id": second.id}))
    assert [m.id for m in machines.list_machines("web", include_destroyed=True)] == ["m3"]


def test_only_the_newest_config_versions_are_kept(tmp_path: Path) -> None:
    store = SqliteMachineStore(tmp_path / "db", keep_versions=3)
    store.insert_machine(machine("m1"))
    for version in range(2, 9):
        store.apply_config_version("m1", MachineConfig(image=f"v{version}"), version, "i", 1.0)
    assert [v["version"] for v in store.list_config_versions("m1")] == [6, 7, 8]
