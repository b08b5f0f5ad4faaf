"""The fleet's MachineStore on etcd: apps, machines, config versions, events and leases, shared
by every API replica and agent.

Keys (``KeyLayout.record``)::

    apps/{app}                      App (an instance: its ``id`` is its machines' ``app_id``)
    app-holds/{app}                 {org_slug, deleted_at}: a deleted name held for its org
    machines/{app}/{machine_id}     Machine (listing an app's machines is one prefix range)
    machine-apps/{machine_id}       the app a machine belongs to (never changes: cached)
    machine-names/{app}/{name}      the id of the live (not destroyed) machine with that name
    org-usage/{org}                 the org's usage counters (``Footprint.counters``), written
                                    in every machine write's own transaction
    machine-versions/{id}/{version} a config version: {version, config, created_at, replaced_at}
    events/{machine_id}/{event_id}  MachineEvent, ordered by when etcd created the key
    leases/{machine_id}             Lease

A machine's write is one transaction comparing the ``mod_revision`` it read, and writing the
name index with it (a live name is taken only if its key is absent), so two replicas never both
win, and a name freed by a destroy is free in the same commit.

Deleting an app deletes its record and holds its name in one transaction, then its machines'
records in transactions of ``DELETE_BATCH`` machines; a machine left by an interrupted delete
carries the old instance's ``app_id`` and is never listed under the name's next app.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter

from hangar.errors import Conflict, NotFound
from hangar.model.config import MachineConfig, with_metadata_edits
from hangar.model.footprint import Footprint, footprint_change
from hangar.model.machine import ImageRef, Lease, Machine, MachineEvent, MachineState
from hangar.model.services import CheckStatus
from hangar.store.etcd.client import Compare, Delete, EtcdClient, KeyValue, Op, Put, Range, Txn
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.records import answer_kv, with_retries
from hangar.store.machines import DEFAULT_KEEP_VERSIONS, new_app_id
from hangar.store.protocol import App

_VERSION = TypeAdapter(dict[str, Any])
_HOLD = TypeAdapter(dict[str, Any])
_COUNTERS = TypeAdapter(dict[str, int])
DELETE_BATCH = 16
"""Machines whose records one transaction deletes (six keys or ranges each, under etcd's
128 operations a transaction)."""


def _live(machine: Machine) -> bool:
    return machine.state is not MachineState.DESTROYED


def _counted(machine: Machine) -> MachineConfig | None:
    """The config ``machine`` counts with against its org's quotas (None: destroyed)."""
    return machine.config if _live(machine) else None


class EtcdMachineStore:
    """A ``MachineStore`` over etcd. Thread-safe (the client is)."""

    def __init__(
        self,
        client: EtcdClient,
        layout: KeyLayout | None = None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
    ) -> None:
        self._client = client
        self._layout = layout or KeyLayout()
        self.keep_versions = max(1, keep_versions)
        self._app_of: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------------

    def _app_key(self, name: str) -> str:
        return self._layout.record("apps", name)

    def _machine_key(self, app: str, machine_id: str) -> str:
        return self._layout.record("machines", app, machine_id)

    def _name_key(self, machine: Machine) -> str:
        return self._layout.record("machine-names", machine.app, machine.name)

    def _version_key(self, machine_id: str, version: int) -> str:
        return self._layout.record("machine-versions", machine_id, f"{version:012d}")

    # apps
    def create_app(
        self,
        name: str,
        org_slug: str,
        now: float,
        network: str = "default",
        name_hold_s: float = 0.0,
    ) -> App:
        """A new app instance; a name deleted less than ``name_hold_s`` ago stays its
        previous org's (another org gets the same 409 as for a name in use)."""
        app = App(name=name, org_slug=org_slug, created_at=now, network=network, id=new_app_id())
        key, hold_key = self._app_key(name), self._layout.record("app-holds", name)

        def attempt() -> App | None:
            hold = self._client.get(hold_key)
            if hold is not None:
                held = _HOLD.validate_json(hold.value)
                if held["org_slug"] != org_slug and float(held["deleted_at"]) + name_hold_s > now:
                    raise Conflict(f"app {name} already exists", app=name)
            hold_unchanged = (
                Compare.mod_revision_is(hold_key, hold.mod_revision)
                if hold is not None
                else Compare.absent(hold_key)
            )
            result = self._client.txn(
                Txn(
                    compare=(Compare.absent(key), hold_unchanged),
                    success=(Put(key, app.model_dump_json().encode()), Delete(hold_key)),
                    failure=(Range(key),),
                )
            )
            if result.succeeded:
                return app
            if answer_kv(result, 0) is not None:
                raise Conflict(f"app {name} already exists", app=name)
            return None  # the hold changed meanwhile: look again

        return with_retries(f"app {name}", attempt)

    def get_app(self, name: str) -> App | None:
        kv = self._client.get(self._app_key(name))
        return None if kv is None else App.model_validate_json(kv.value)

    def list_apps(self, org_slug: str | None) -> list[App]:
        kvs = self._client.range_prefix(self._layout.records("apps")).kvs
        apps = [App.model_validate_json(kv.value) for kv in kvs]
        return sorted(
            (app for app in apps if org_slug is None or app.org_slug == org_slug),
            key=lambda app: app.name,
        )

    def delete_app(self, name: str, now: float = 0.0) -> list[str]:
        """Delete the app and every record of its machines (configs and their versions,
        events, leases); the name is held for its org from ``now``. Returns the ids of the
        machines whose records were deleted."""
        key = self._app_key(name)
        kv = self._client.get(key)
        if kv is None:
            return []
        app = App.model_validate_json(kv.value)
        hold = json.dumps({"org_slug": app.org_slug, "deleted_at": now}).encode()
        machines = self._client.range_prefix(self._layout.records("machines", name)).kvs
        records = [Machine.model_validate_json(machine.value) for machine in machines]
        uncount = Footprint()
        for machine in records:
            config = _counted(machine)
            if config is not None and machine.app_id in ("", app.id):
                uncount.add(config, sign=-1)
        count_compares, count_ops = (
            self._add_usage(app.org_slug, uncount.counters()) if uncount.counters() else ([], [])
        )
        result = self._client.txn(
            Txn(
                compare=(Compare.mod_revision_is(key, kv.mod_revision), *count_compares),
                success=(
                    Delete(key),
                    Put(self._layout.record("app-holds", name), hold),
                    *count_ops,
                ),
            )
        )
        if not result.succeeded:
            return self.delete_app(name, now)  # changed meanwhile: once more
        for start in range(0, len(records), DELETE_BATCH):
            ops: list[Op] = []
            for machine in records[start : start + DELETE_BATCH]:
                ops += [
                    Delete(self._machine_key(machine.app, machine.id)),
                    Delete(self._layout.record("machine-apps", machine.id)),
                    Delete(self._layout.records("machine-versions", machine.id), prefix=True),
                    Delete(self._layout.records("events", machine.id), prefix=True),
                    Delete(self._layout.record("leases", machine.id)),
                ]
                if _live(machine):
                    ops.append(Delete(self._name_key(machine)))
            self._client.txn(Txn(success=ops))
        with self._lock:
            for machine in records:
                self._app_of.pop(machine.id, None)
        return [machine.id for machine in records]

    # machines
    def _machine_app(self, machine_id: str) -> str | None:
        with self._lock:
            app = self._app_of.get(machine_id)
        if app is not None:
            return app
        kv = self._client.get(self._layout.record("machine-apps", machine_id))
        if kv is None:
            return None
        app = kv.value.decode()
        with self._lock:
            self._app_of[machine_id] = app
        return app

    def insert_machine(self, machine: Machine) -> None:
        if not machine.app_id:
            app = self.get_app(machine.app)
            machine = machine.model_copy(update={"app_id": app.id if app is not None else ""})
        key = self._machine_key(machine.app, machine.id)
        name_key = self._name_key(machine)

        def attempt() -> bool | None:
            compares = [Compare.absent(key)]
            ops: list[Op] = [
                Put(key, machine.model_dump_json().encode()),
                Put(self._layout.record("machine-apps", machine.id), machine.app.encode()),
                Put(
                    self._version_key(machine.id, machine.version),
                    _version_record(machine.version, machine.config, machine.created_at),
                ),
            ]
            if _live(machine):
                compares.append(Compare.absent(name_key))
                ops.append(Put(name_key, machine.id.encode()))
            more_compares, more_ops = self._count(machine, None, _counted(machine))
            result = self._client.txn(
                Txn(
                    compare=[*compares, *more_compares],
                    success=[*ops, *more_ops],
                    failure=(Range(key), Range(name_key)),
                )
            )
            if result.succeeded:
                return True
            if answer_kv(result, 0) is not None:
                raise Conflict(f"machine {machine.id} already exists", machine_id=machine.id)
            if _live(machine) and answer_kv(result, 1) is not None:
                raise Conflict(
                    f"a machine named {machine.name} already exists in app {machine.app}",
                    field="name",
                )
            return None  # the org's counters moved meanwhile: again

        with_retries(f"machine {machine.id}", attempt)
        with self._lock:
            self._app_of[machine.id] = machine.app

    # usage counters
    def _org_counting(self, machine: Machine) -> str | None:
        """The org a machine counts for: its app's, unless the app is gone or is a later
        instance of the name."""
        app = self.get_app(machine.app)
        if app is None or machine.app_id not in ("", app.id):
            return None
        return app.org_slug

    def _count(
        self, machine: Machine, before: MachineConfig | None, after: MachineConfig | None
    ) -> tuple[list[Compare], list[Op]]:
        """The compare and write that move ``machine``'s org counters from ``before`` to
        ``after``, for the machine write's own transaction (nothing when nothing changes)."""
        change = footprint_change(before, after)
        org = self._org_counting(machine) if change else None
        if org is None:
            return [], []
        return self._add_usage(org, change)

    def _add_usage(self, org: str, change: dict[str, int]) -> tuple[list[Compare], list[Op]]:
        key = self._layout.record("org-usage", org)
        kv = self._client.get(key)
        counters: dict[str, int] = _COUNTERS.validate_json(kv.value) if kv is not None else {}
        for name, amount in change.items():
            counters[name] = counters.get(name, 0) + amount
        unchanged = (
            Compare.mod_revision_is(key, kv.mod_revision) if kv is not None else Compare.absent(key)
        )
        kept = {name: amount for name, amount in counters.items() if amount}
        return [unchanged], [Put(key, json.dumps(kept).encode())]

    def machine_usage(self, org_slug: str) -> Footprint:
        kv = self._client.get(self._layout.record("org-usage", org_slug))
        return Footprint.from_counters(_COUNTERS.validate_json(kv.value) if kv else {})

    def _read(self, machine_id: str) -> tuple[KeyValue, Machine] | None:
        app = self._machine_app(machine_id)
        if app is None:
            return None
        kv = self._client.get(self._machine_key(app, machine_id))
        return None if kv is None else (kv, Machine.model_validate_json(kv.value))

    def get_machine(self, machine_id: str) -> Machine | None:
        read = self._read(machine_id)
        return None if read is None else read[1]

    def list_machines(
        self,
        app: str | None,
        include_destroyed: bool = False,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Machine]:
        """Oldest first (``created_at``, then id); ``after``: those after that machine."""
        prefix = self._layout.records("machines", app) if app is not None else None
        kvs = self._client.range_prefix(prefix or self._layout.records("machines")).kvs
        machines = sorted(
            (Machine.model_validate_json(kv.value) for kv in kvs),
            key=lambda machine: (machine.created_at, machine.id),
        )
        current = self.get_app(app) if app is not None else None
        found = [
            m
            for m in machines
            if (include_destroyed or _live(m)) and (current is None or m.app_id == current.id)
        ]
        if after is not None:
            cursor = next((m for m in machines if m.id == after), None)
            if cursor is None:
                return []
            found = [m for m in found if (m.created_at, m.id) > (cursor.created_at, cursor.id)]
        return found[:limit] if limit is not None else found

    def _change(
        self,
        machine_id: str,
        change: Callable[[Machine], Machine],
        *,
        extra: Callable[[Machine], tuple[Sequence[Compare], Sequence[Op]]] | None = None,
        missing_ok: bool = False,
    ) -> Machine | None:
        """Read, change and compare-and-set one machine (and its name index); ``extra``
        adds compares and writes to the same transaction."""

        def attempt() -> tuple[Machine | None] | None:
            read = self._read(machine_id)
            if read is None:
                if missing_ok:
                    return (None,)
                raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)
            kv, old = read
            new = change(old.model_copy(deep=True))
            compares: list[Compare] = [Compare.mod_revision_is(kv.key, kv.mod_revision)]
            ops: list[Op] = [Put(kv.key, new.model_dump_json().encode())]
            if (_live(old), old.name) != (_live(new), new.name):
                if _live(old):
                    ops.append(Delete(self._name_key(old)))
                if _live(new):
                    compares.append(Compare.absent(self._name_key(new)))
                    ops.append(Put(self._name_key(new), new.id.encode()))
            if extra is not None:
                more_compares, more_ops = extra(new)
                compares.extend(more_compares)
                ops.extend(more_ops)
            count_compares, count_ops = self._count(old, _counted(old), _counted(new))
            compares.extend(count_compares)
            ops.extend(count_ops)
            name_key = self._name_key(new)
            result = self._client.txn(
                Txn(compare=compares, success=ops, failure=(Range(kv.key), Range(name_key)))
            )
            if result.succeeded:
                return (new,)
            current, named = answer_kv(result, 0), answer_kv(result, 1)
            renamed = (_live(old), old.name) != (_live(new), new.name) and _live(new)
            if (
                current is not None
                and current.mod_revision == kv.mod_revision
                and renamed
                and named is not None
                and named.value != new.id.encode()
            ):
                raise Conflict(
                    f"a machine named {new.name} already exists in app {new.app}",
                    field="name",
                )
            return None  # the machine, a config version or the org's counters moved: again

        return with_retries(f"machine {machine_id}", attempt)[0]

    def save_machine(self, machine: Machine) -> None:
        # app_id is the machine's for good: never rewritten
        self._change(machine.id, lambda old: machine.model_copy(update={"app_id": old.app_id}))

    def set_image_ref(self, machine_id: str, image_ref: ImageRef, now: float) -> None:
        def change(machine: Machine) -> Machine:
            machine.image_ref, machine.updated_at = image_ref, now
            return machine

        self._change(machine_id, change, missing_ok=True)

    def set_cordoned(self, machine_id: str, cordoned: bool, now: float) -> None:
        def change(machine: Machine) -> Machine:
            machine.cordoned, machine.updated_at = cordoned, now
            return machine

        self._change(machine_id, change)

    def set_checks(self, machine_id: str, checks: list[CheckStatus]) -> None:
        def change(machine: Machine) -> Machine:
            machine.checks = list(checks)
            return machine

        self._change(machine_id, change, missing_ok=True)

    def set_skip_secrets(self, machine_id: str, skip_secrets: bool, now: float) -> None:
        def change(machine: Machine) -> Machine:
            machine.skip_secrets, machine.updated_at = skip_secrets, now
            return machine

        self._change(machine_id, change)

    def update_metadata(
        self, machine_id: str, changes: dict[str, str | None], now: float
    ) -> dict[str, str]:
        def change(machine: Machine) -> Machine:
            metadata = dict(machine.config.metadata)
            for key, value in changes.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            machine.config = machine.config.model_copy(update={"metadata": metadata})
            machine.updated_at = now
            return machine

        changed = self._change(machine_id, change)
        assert changed is not None
        return dict(changed.config.metadata)

    def set_state(
        self, machine_id: str, state: MachineState, now: float, reason: str = ""
    ) -> Machine:
        def change(machine: Machine) -> Machine:
            machine.state, machine.updated_at, machine.failure_reason = state, now, reason
            return machine

        changed = self._change(machine_id, change)
        assert changed is not None
        return changed

    def apply_config_version(
        self,
        machine_id: str,
        config: MachineConfig,
        version: int,
        instance_id: str,
        now: float,
        metadata_before: dict[str, str] | None = None,
    ) -> None:
        def change(machine: Machine) -> Machine:
            if metadata_before is not None:
                # metadata edits made since the update was asked for are kept
                config_now = with_metadata_edits(config, metadata_before, machine.config.metadata)
            else:
                config_now = config
            machine.version, machine.config = version, config_now
            machine.instance_id, machine.updated_at = instance_id, now
            return machine

        def versions(changed: Machine) -> tuple[Sequence[Compare], Sequence[Op]]:
            writes: dict[str, bytes] = {}
            compares: list[Compare] = []
            kept: dict[int, str] = {}
            for kv in self._client.range_prefix(
                self._layout.records("machine-versions", machine_id)
            ).kvs:
                record = _VERSION.validate_json(kv.value)
                kept[int(record["version"])] = kv.key
                if record.get("replaced_at") is None:
                    record["replaced_at"] = now
                    writes[kv.key] = json.dumps(record).encode()
                    compares.append(Compare.mod_revision_is(kv.key, kv.mod_revision))
            new_key = self._version_key(machine_id, version)
            writes[new_key] = _version_record(version, changed.config, now)
            kept[version] = new_key
            dropped = sorted(kept)[: max(0, len(kept) - self.keep_versions)]
            ops: list[Op] = [Delete(kept[number]) for number in dropped]
            ops += [Put(key, value) for key, value in writes.items() if key not in ops_keys(ops)]
            return compares, ops

        self._change(machine_id, change, extra=versions)

    def list_config_versions(self, machine_id: str) -> list[dict[str, Any]]:
        kvs = self._client.range_prefix(self._layout.records("machine-versions", machine_id)).kvs
        records = [_VERSION.validate_json(kv.value) for kv in kvs]
        return [
            {
                **{key: record.get(key) for key in ("version", "created_at", "replaced_at")},
                "config": MachineConfig.model_validate(record["config"]),
            }
            for record in sorted(records, key=lambda record: int(record["version"]))
        ]

    # events
    def add_event(self, machine_id: str, event: MachineEvent) -> None:
        key = self._layout.record("events", machine_id, event.id)
        self._client.txn(
            Txn(
                compare=(Compare.absent(key),),
                success=(Put(key, event.model_dump_json().encode()),),
            )
        )

    def list_events(self, machine_id: str, limit: int | None = None) -> list[MachineEvent]:
        if limit is not None and limit <= 0:
            return []
        result = self._client.range(
            Range(
                self._layout.records("events", machine_id),
                prefix=True,
                limit=limit or 0,
                sort_target="CREATE",
                descending=True,
            )
        )
        return [MachineEvent.model_validate_json(kv.value) for kv in result.kvs]

    # leases
    def get_lease(self, machine_id: str) -> Lease | None:
        kv = self._client.get(self._layout.record("leases", machine_id))
        return None if kv is None else Lease.model_validate_json(kv.value)

    def put_lease(self, machine_id: str, lease: Lease) -> None:
        self._client.put(
            self._layout.record("leases", machine_id), lease.model_dump_json().encode()
        )

    def delete_lease(self, machine_id: str) -> None:
        self._client.delete(self._layout.record("leases", machine_id))


def _version_record(version: int, config: MachineConfig, created_at: float) -> bytes:
    return json.dumps(
        {
            "version": version,
            "config": config.model_dump(mode="json"),
            "created_at": created_at,
            "replaced_at": None,
        }
    ).encode()


def ops_keys(ops: Sequence[Op]) -> set[str]:
    return {op.key for op in ops if isinstance(op, Delete)}
