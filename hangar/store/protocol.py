"""The stores, split by concern: machines (shared by a fleet), a host's runs and GPUs (each
host's own), tenancy (orgs, tokens, audit). The scheduler's host claims are its own protocol,
``hangar.scheduler.ClaimStore``.

Kept free of any backend's idioms: the embedded backend is SQLite, the fleet backend etcd.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from pydantic import BaseModel, Field

from hangar.model.config import MachineConfig
from hangar.model.footprint import Footprint
from hangar.model.gpu import GpuEvent, GpuRecord
from hangar.model.machine import ImageRef, Lease, Machine, MachineEvent, MachineState
from hangar.model.run import RunRecord
from hangar.model.services import CheckStatus
from hangar.model.volume import Volume


class App(BaseModel):
    name: str
    org_slug: str
    created_at: float
    network: str = "default"
    """The app's private network (Fly's ``network``): its org's."""
    numeric_id: int = 0
    """Fly's ``internal_numeric_id``: a number of its own, given at creation."""
    id: str = ""
    """This instance of the name: machines belong to it, not to the name."""


class MachineStore(Protocol):
    """Apps and their machines, with their config versions, events and leases: what the API
    reads and writes, shared by every host of a fleet."""

    # apps
    def create_app(
        self,
        name: str,
        org_slug: str,
        now: float,
        network: str = "default",
        name_hold_s: float = 0.0,
    ) -> App:
        """A new app instance (``Conflict`` if the name is taken, or was deleted by another
        org less than ``name_hold_s`` ago)."""
        ...

    def get_app(self, name: str) -> App | None: ...
    def list_apps(self, org_slug: str | None) -> list[App]: ...
    def delete_app(self, name: str, now: float = 0.0) -> list[str]:
        """Delete the app and every record of its machines; hold the name for its org.
        Returns the ids of the machines whose records were deleted."""
        ...

    # machines
    def insert_machine(self, machine: Machine) -> None: ...
    def get_machine(self, machine_id: str) -> Machine | None: ...
    def list_machines(
        self,
        app: str | None,
        include_destroyed: bool = False,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Machine]:
        """Oldest first (by ``created_at``, then id). ``limit``: at most that many;
        ``after``: only those after that machine in this order (a page's last machine; an
        unknown id gives none)."""
        ...

    def save_machine(self, machine: Machine) -> None: ...
    def set_image_ref(self, machine_id: str, image_ref: ImageRef, now: float) -> None: ...
    def set_cordoned(self, machine_id: str, cordoned: bool, now: float) -> None: ...
    def set_checks(self, machine_id: str, checks: list[CheckStatus]) -> None: ...
    def set_skip_secrets(self, machine_id: str, skip_secrets: bool, now: float) -> None: ...
    def update_metadata(
        self, machine_id: str, changes: dict[str, str | None], now: float
    ) -> dict[str, str]:
        """Set each key to its value, or remove it where the value is None, in one
        transaction that touches nothing else of the machine; the metadata after."""
        ...

    def set_state(
        self, machine_id: str, state: MachineState, now: float, reason: str = ""
    ) -> Machine: ...
    def apply_config_version(
        self,
        machine_id: str,
        config: MachineConfig,
        version: int,
        instance_id: str,
        now: float,
        metadata_before: dict[str, str] | None = None,
    ) -> None:
        """Make ``config`` version ``version`` with ``instance_id``, the previous version
        ``replaced``: all of it in one transaction. With ``metadata_before`` (the metadata
        when the change was asked for), the metadata edits made since are kept
        (:func:`hangar.model.config.with_metadata_edits`)."""
        ...

    def list_config_versions(self, machine_id: str) -> list[dict[str, Any]]:
        """Each version the machine had, oldest first: ``version``, ``config`` (a
        ``MachineConfig``), ``created_at`` and ``replaced_at`` (None for the current one)."""
        ...

    # usage counters
    def machine_usage(self, org_slug: str) -> Footprint:
        """What the org's machines that are not destroyed add up to (quotas read this). Kept
        as counters that every machine write changes in its own transaction (insert, save,
        state, config version; an app's deletion uncounts its machines): reading them costs
        the same however many machines there are."""
        ...

    # events
    def add_event(self, machine_id: str, event: MachineEvent) -> None: ...
    def list_events(self, machine_id: str, limit: int | None = None) -> list[MachineEvent]: ...

    # leases
    def get_lease(self, machine_id: str) -> Lease | None: ...
    def put_lease(self, machine_id: str, lease: Lease) -> None: ...
    def delete_lease(self, machine_id: str) -> None: ...


class RunStore(Protocol):
    """A host agent's own durable state: its runs and the VMMs it launched (never shared:
    each host keeps its own, as Fly's flyd keeps its own database)."""

    def insert_run(self, run: RunRecord) -> bool:
        """Insert unless a run with this id exists (False then): ids make submits idempotent."""
        ...

    def save_run(self, run: RunRecord) -> None: ...
    def list_runs(
        self, machine_id: str | None = None, unfinished_only: bool = False
    ) -> list[RunRecord]: ...
    def forget_machines(self, machine_ids: list[str]) -> None:
        """Delete every run and VMM handle of these machines (their app was deleted)."""
        ...

    # VMM handles (what the agent needs to re-adopt a VM after a restart)
    def put_vm_handle(self, machine_id: str, handle: dict[str, Any]) -> None: ...
    def get_vm_handle(self, machine_id: str) -> dict[str, Any] | None: ...
    def delete_vm_handle(self, machine_id: str) -> None: ...
    def list_vm_handles(self) -> dict[str, dict[str, Any]]: ...


class SecretRecord(BaseModel):
    """A secret as it may be shown: its name and a digest of its value, never the value."""

    name: str
    digest: str
    created_at: float
    updated_at: float


class SecretStore(Protocol):
    """Apps' secrets, sealed at rest. Every change is one transaction that moves the app's
    secrets version on by one (Fly's ``version``)."""

    def update_secrets(self, app: str, values: Mapping[str, bytes | None], now: float) -> int:
        """Set each value, or remove it where it is None; the app's new secrets version."""
        ...

    def list_secrets(self, app: str) -> list[SecretRecord]: ...
    def secrets_version(self, app: str) -> int:
        """0 for an app that never had a secret."""
        ...

    def open_secrets(self, app: str, names: Collection[str] | None = None) -> dict[str, bytes]:
        """The values (all, or those named: ``NotFound`` names a missing one), for a boot."""
        ...

    def delete_app_secrets(self, app: str) -> None: ...


class VolumeStore(Protocol):
    """Volumes of every app, shared by a fleet (each record names the host its image is
    on). A record changes only by compare-and-set on its ``version``; the changes hangar
    makes (attach, detach, state moves) are built on that in ``hangar.store.volume_claims``."""

    def insert_volume(self, volume: Volume) -> None:
        """Add a new record (``Conflict`` if the id is taken)."""
        ...

    def get_volume(self, volume_id: str) -> Volume | None: ...
    def list_volumes(
        self,
        app: str | None = None,
        *,
        host_id: str | None = None,
        include_destroyed: bool = False,
    ) -> list[Volume]:
        """Oldest first."""
        ...

    def compare_and_set_volume(self, volume: Volume) -> bool:
        """Store ``volume`` if the record's version is still ``volume.version`` (it is
        stored with the next version); False if it changed meanwhile or is gone."""
        ...

    def forget_volumes(self, app: str) -> list[str]:
        """Delete the records of ``app``'s destroyed volumes (the app is being deleted: its
        name's next owner must not see them); returns their ids."""
        ...


class GpuStore(Protocol):
    """A host's GPUs as its agent found them (inventory, VFIO binding, why one is out of use)
    and what happened to each. Who holds a GPU, and whether it is free, cleaning or
    quarantined, is the host's claim record (``hangar.scheduler.ClaimStore``)."""

    def upsert_gpu_inventory(self, gpu: GpuRecord) -> GpuRecord:
        """Register a GPU found on the host; an existing record keeps what the agent wrote
        (its group claim, binding and quarantine reason)."""
        ...

    def list_gpus(self, host_id: str | None = None) -> list[GpuRecord]: ...
    def get_gpu(self, bdf: str) -> GpuRecord | None: ...
    def save_gpu(self, gpu: GpuRecord) -> None: ...
    def add_gpu_event(self, event: GpuEvent) -> None: ...
    def list_gpu_events(self, bdf: str | None = None) -> list[GpuEvent]: ...


# Tenancy: orgs own apps; tokens act for an org (or one of its apps) or for the operator.
class TokenKind(enum.StrEnum):
    OPERATOR = "operator"
    ORG = "org"


class OrgQuotas(BaseModel):
    """Per-org limits over its machines that are not destroyed and its volumes that hold
    space; ``None`` means no limit."""

    machines: int | None = None
    memory_mb: int | None = None
    gpus: dict[str, int] = Field(default_factory=dict)
    """GPU kind -> most GPUs of that kind; a kind not named here is not limited."""
    volumes: int | None = None
    volume_gb: int | None = None
    """The most GB all of the org's volumes may add up to."""


class Org(BaseModel):
    slug: str
    name: str
    created_at: float
    quotas: OrgQuotas = Field(default_factory=OrgQuotas)


class ApiToken(BaseModel):
    """A token as stored: never its secret, only what it may do. An org token with
    ``app_name`` acts on that app alone; an operator token has no org."""

    id: str
    kind: TokenKind
    org_slug: str | None = None
    app_name: str | None = None
    read_only: bool = False
    description: str = ""
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None


class AuditRecord(BaseModel):
    """One mutating call or operator action: who, in which org, did what to what, and how it
    ended (``outcome``: ok, denied, rate_limited, rejected or error; ``status``: HTTP code)."""

    seq: int = 0
    timestamp: float
    token_id: str
    org_slug: str
    action: str
    target: str
    app_name: str = ""
    machine_id: str = ""
    outcome: str
    status: int


class TenancyStore(Protocol):
    # orgs
    def create_org(self, slug: str, name: str, now: float, quotas: OrgQuotas | None = None) -> Org:
        """A new org with ``quotas`` (the operator's defaults for new orgs)."""
        ...

    def ensure_org(self, slug: str, now: float, quotas: OrgQuotas | None = None) -> Org:
        """The org, created with ``quotas`` if it did not exist."""
        ...

    def get_org(self, slug: str) -> Org | None: ...
    def list_orgs(self) -> list[Org]: ...
    def set_quotas(self, slug: str, quotas: OrgQuotas) -> Org: ...

    # private networks: each org's number in the private addresses of its machines
    def network_numbers(self) -> dict[int, str]: ...
    def assign_network_number(self, slug: str, number: int) -> int: ...

    # tokens (looked up by the hash of their secret)
    def insert_token(self, token: ApiToken, secret_hash: str) -> None: ...
    def token_by_hash(self, secret_hash: str) -> ApiToken | None: ...
    def get_token(self, token_id: str) -> ApiToken | None: ...
    def list_tokens(self, org_slug: str | None = None) -> list[ApiToken]: ...
    def revoke_token(self, token_id: str, now: float) -> ApiToken: ...

    # audit log
    def add_audit(self, record: AuditRecord) -> AuditRecord: ...
    def prune_audit(self, before: float) -> int:
        """Delete the records made before ``before``; returns how many."""
        ...

    def list_audit(
        self, org_slug: str | None = None, limit: int = 100, before_seq: int | None = None
    ) -> list[AuditRecord]: ...
