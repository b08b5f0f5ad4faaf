"""hangar's fleet backend on etcd (3.4+, through its JSON gateway).

- ``client``: ``EtcdClient``, a typed client (ranges, puts, transactions with compares, leases)
  that fails over between members and raises ``StoreUnavailable`` when none can answer;
- ``watch`` and ``cache``: watches that resume after lost members and compaction, and
  ``PrefixCache``, an in-process copy of a prefix that reads keep answering from while etcd is
  down;
- ``claims``: ``EtcdClaimStore``, the scheduler's claim protocol (one key per host);
- ``machines``, ``tenancy``, ``volumes``: ``EtcdMachineStore``, ``EtcdTenancyStore`` (token
  hashes sealed) and ``EtcdVolumeStore``, the fleet's shared stores, every change one
  compare-and-set transaction (``records``);
- ``hosts``: ``HostLease`` (an agent's registration under a lease it keeps alive) and
  ``HostMonitor`` (which hosts are reachable);
- ``sealed``: ``Sealer`` and ``SealedValues``, secrets encrypted at rest;
- ``keys``: ``KeyLayout``, where each kind of record lives under the fleet's prefix;
- ``local``: ``LocalEtcdCluster``, real etcd members on loopback for tests and benchmarks.
"""

from hangar.store.etcd.cache import CacheChange, PrefixCache
from hangar.store.etcd.claims import EtcdClaimStore
from hangar.store.etcd.client import EtcdClient, KeyValue
from hangar.store.etcd.hosts import HostLease, HostMonitor, HostRecord, HostStatus
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.machines import EtcdMachineStore
from hangar.store.etcd.sealed import SealedValues, Sealer
from hangar.store.etcd.tenancy import EtcdTenancyStore
from hangar.store.etcd.volumes import EtcdVolumeStore

__all__ = [
    "CacheChange",
    "EtcdClaimStore",
    "EtcdClient",
    "EtcdMachineStore",
    "EtcdTenancyStore",
    "EtcdVolumeStore",
    "HostLease",
    "HostMonitor",
    "HostRecord",
    "HostStatus",
    "KeyLayout",
    "KeyValue",
    "PrefixCache",
    "SealedValues",
    "Sealer",
]
