"""Store tests run against real backends: SQLite files and a real etcd cluster."""

from tests.fixtures.etcd import (
    etcd_client,
    etcd_cluster,
    etcd_layout,
    own_etcd_cluster,
    store_scratch,
)

__all__ = [
    "etcd_client",
    "etcd_cluster",
    "etcd_layout",
    "own_etcd_cluster",
    "store_scratch",
]
