"""The stores a fleet shares in etcd, opened once per process from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from hangar.errors import InvalidRequest
from hangar.fleet.board import RunBoard
from hangar.fleet.work import WorkQueue
from hangar.settings import Settings
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.machines import EtcdMachineStore
from hangar.store.etcd.sealed import Sealer
from hangar.store.etcd.tenancy import EtcdTenancyStore
from hangar.store.etcd.volumes import EtcdVolumeStore


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

    def close(self) -> None:
        self.claims.close()
        self.client.close()


def fleet_sealer(settings: Settings) -> Sealer:
    """The fleet's sealing key: ``HANGAR_ETCD_KEY_FILE``, or one made in ``$HANGAR_HOME``."""
    path = settings.fleet_key_file
    if settings.etcd_key_file is None and not path.exists():
        Sealer.create_key_file(path)
    return Sealer([Sealer.read_key_file(path)])


def open_fleet_stores(
    settings: Settings, *, sealer: Sealer | None = None, tokens: bool = True
) -> FleetStores:
    """``tokens``: this process authenticates (an API replica) and needs the fleet's sealing
    key; a host's agent does not, and never holds it."""
    if not settings.etcd:
        raise InvalidRequest("no etcd endpoints given (--etcd or HANGAR_ETCD)", field="etcd")
    client = EtcdClient(settings.etcd, stale_reads=True)
    layout = KeyLayout(settings.etcd_prefix)
    return FleetStores(
        client=client,
        layout=layout,
        machines=EtcdMachineStore(client, layout),
        tenancy=EtcdTenancyStore(
            client, (sealer or fleet_sealer(settings)) if tokens else None, layout
        ),
        volumes=EtcdVolumeStore(client, layout),
        claims=EtcdClaimStore(client, layout),
        work=WorkQueue(client, layout),
        board=RunBoard(client, layout),
    )
