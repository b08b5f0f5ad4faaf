"""The stores a fleet shares in etcd, opened once per process from the settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hangar.errors import InvalidRequest, SealedValueError
from hangar.fleet.board import RunBoard
from hangar.fleet.work import WorkQueue
from hangar.model.run import VOLUME_SUBJECT_PREFIX
from hangar.settings import Settings
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import Compare, EtcdClient, Put, Txn
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.llm import EtcdLlmStore
from hangar.store.etcd.machines import EtcdMachineStore
from hangar.store.etcd.sealed import SealedValues, Sealer
from hangar.store.etcd.secrets import EtcdSecretStore
from hangar.store.etcd.tenancy import EtcdTenancyStore
from hangar.store.etcd.usage import EtcdUsageStore
from hangar.store.etcd.volumes import EtcdVolumeStore

log = logging.getLogger(__name__)


@dataclass
class FleetStores:
    client: EtcdClient
    layout: KeyLayout
    machines: EtcdMachineStore
    tenancy: EtcdTenancyStore
    volumes: EtcdVolumeStore
    claims: EtcdClaimStore
    work: WorkQueue
    board: RunBoard
    secrets: EtcdSecretStore | None
    """Apps' secrets, sealed; None in a process without the fleet's key (an agent not given
    one: its machines boot without their apps' secrets)."""
    usage: EtcdUsageStore
    """Metered intervals, published by the agents, read by the replicas."""
    sealer: Sealer | None = None
    """The fleet's key, where this process holds it (what the relay's credential is derived
    from: ``hangar.fleet.relay``)."""
    llm: EtcdLlmStore | None = None
    """Model deployments, their API keys and token usage; None without the fleet's key."""

    def host_of(self, subject: str) -> str | None:
        """The host whose agent runs ``subject``'s runs: a machine's, or (``vol:ID``) a
        volume's; None when there is no such record or it has no host yet."""
        if subject.startswith(VOLUME_SUBJECT_PREFIX):
            volume = self.volumes.get_volume(subject.removeprefix(VOLUME_SUBJECT_PREFIX))
            return volume.host_id if volume is not None and volume.host_id else None
        machine = self.machines.get_machine(subject)
        return machine.host_id if machine is not None and machine.host_id else None

    def run_unfinished(self, host_id: str, machine_id: str) -> bool:
        """A run of ``machine_id`` is waiting for ``host_id``'s agent, or its agent published
        one it has not finished."""
        if self.work.pending(host_id, machine_id):
            return True
        entry = self.board.read(host_id, machine_id)
        return entry is not None and entry.unfinished

    def close(self) -> None:
        self.claims.close()
        self.client.close()


def fleet_sealer(settings: Settings) -> Sealer:
    """The fleet's sealing key: ``HANGAR_ETCD_KEY_FILE``, or one made in ``$HANGAR_HOME`` (for
    a fleet's first replica: the others need a copy, ``check_fleet_key`` says so)."""
    path = settings.fleet_key_file
    if settings.etcd_key_file is None and not path.exists():
        Sealer.create_key_file(path)
        log.warning("made the fleet's sealing key %s: give every other API replica a copy", path)
    return Sealer([Sealer.read_key_file(path)])


CANARY_KIND = "fleet-key"
CANARY_NAME = "canary"


def check_fleet_key(client: EtcdClient, sealer: Sealer, layout: KeyLayout) -> None:
    """Refuse a sealing key the fleet's sealed records were not sealed with: the first
    process seals a canary value, every later one must open it (else its tokens would all
    look unknown, and the tokens it wrote would be unreadable to the other replicas)."""
    key = layout.sealed(CANARY_KIND, CANARY_NAME)
    client.txn(
        Txn(
            compare=(Compare.absent(key),),
            success=(Put(key, sealer.seal(b"hangar fleet key", key)),),
        )
    )
    try:
        SealedValues(client, sealer, layout).get(CANARY_KIND, CANARY_NAME)
    except SealedValueError:
        raise InvalidRequest(
            "this process's sealing key is not the fleet's: copy the key file every other "
            "replica uses and point HANGAR_ETCD_KEY_FILE at it",
            field="etcd_key_file",
        ) from None


def open_fleet_stores(
    settings: Settings, *, sealer: Sealer | None = None, tokens: bool = True
) -> FleetStores:
    """``tokens``: this process authenticates (an API replica) and needs the fleet's sealing
    key. A host's agent does not, and holds the key only when its operator gives it one
    (``HANGAR_ETCD_KEY_FILE``): then it opens its machines' app secrets for their boots."""
    if not settings.etcd:
        raise InvalidRequest("no etcd endpoints given (--etcd or HANGAR_ETCD)", field="etcd")
    client = EtcdClient(settings.etcd, stale_reads=True)
    layout = KeyLayout(settings.etcd_prefix)
    if tokens:
        sealer = sealer or fleet_sealer(settings)
    elif sealer is None and settings.etcd_key_file is not None:
        sealer = Sealer.from_key_files([settings.etcd_key_file])
    if sealer is not None:
        check_fleet_key(client, sealer, layout)
    return FleetStores(
        client=client,
        layout=layout,
        machines=EtcdMachineStore(client, layout),
        tenancy=EtcdTenancyStore(client, sealer if tokens else None, layout),
        volumes=EtcdVolumeStore(client, layout),
        claims=EtcdClaimStore(client, layout),
        work=WorkQueue(client, layout),
        board=RunBoard(client, layout),
        secrets=None if sealer is None else EtcdSecretStore(client, sealer, layout),
        sealer=sealer,
        usage=EtcdUsageStore(client, layout),
        llm=None if sealer is None else EtcdLlmStore(client, sealer, layout),
    )
