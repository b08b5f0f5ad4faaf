"""A real fleet for the fleet tests: a 3-member etcd cluster, three hosts (each a ``hangar agent``
process in a network namespace of its own, with its own home and SQLite, its own bridge, taps
and nftables rules) on one LAN (a bridge of this machine with a veth port per host; IPv6 between
hosts is the private network's underlay), and two ``hangar api`` replicas, all on a key prefix
of their own; stopped and removed at the end (every QEMU they started killed, the namespaces
and links deleted). etcd answers on loopback for the replicas and on the LAN bridge's address
for the agents."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from hangar.bench.netns import NamespaceLink, namespace_lan
from hangar.fleet.stores import FleetStores, open_fleet_stores
from hangar.images.build import build_busybox_image
from hangar.net.scratch import scratch_network_settings
from hangar.server_process import AgentProcess, ApiReplicaProcess
from hangar.settings import Settings, env_name
from hangar.store.etcd.local import LocalEtcdCluster
from hangar.store.etcd.sealed import Sealer
from tests.conftest import kill_vmms_under
from tests.fixtures.etcd import etcd_client, etcd_cluster, etcd_layout

__all__ = ["etcd_client", "etcd_cluster", "etcd_layout"]

LEASE_TTL_S = 3
HOSTS = ("h1", "h2", "h3")
REGION = "local"
SLEEPER_TAG = "sleeper"


@dataclass
class Fleet:
    cluster: LocalEtcdCluster
    env: dict[str, str]
    agents: dict[str, AgentProcess]
    replicas: list[ApiReplicaProcess]
    stores: FleetStores
    """The test's own view of the fleet's shared records (invariants, fixture hosts)."""
    sleeper_image: str
    links: dict[str, NamespaceLink]
    """Each host's namespace and its port on the LAN, its only way to etcd and the others."""

    def api(self, replica: int) -> httpx.Client:
        token = self.replicas[0].operator_token  # the first replica minted it; all accept it
        return self.replicas[replica].client(token)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    layout = base / "oci"
    build_busybox_image(layout, SLEEPER_TAG, ["sh", "-c", "echo up; sleep 3600"], {})
    key_file = Sealer.create_key_file(base / "fleet.key")
    bundle = base / "driver-bundle.ext4"
    bundle.write_bytes(b"")  # GPU admission only asks that it exists (no guest boots here)
    env = {
        **scratch_network_settings(),
        env_name("etcd_key_file"): str(key_file),
        env_name("etcd_prefix"): f"/fleet-{secrets.token_hex(4)}",
        env_name("host_lease_ttl_s"): str(LEASE_TTL_S),
        env_name("gpu_driver_bundle"): str(bundle),
    }
    with contextlib.ExitStack() as stack:
        links = dict(zip(HOSTS, stack.enter_context(namespace_lan(len(HOSTS))), strict=True))
        cluster = stack.enter_context(
            LocalEtcdCluster(3, extra_client_hosts=(links[HOSTS[0]].host_ip,))
        )
        settings = Settings(
            home=base / "test",
            etcd=tuple(cluster.endpoints),
            etcd_prefix=env[env_name("etcd_prefix")],
            etcd_key_file=key_file,
        )
        stores = open_fleet_stores(settings)
        agents = {
            host_id: AgentProcess(
                base / host_id,
                cluster.endpoints_at(links[host_id].host_ip),
                host_id,
                REGION,
                "general",
                {
                    **env,
                    env_name("net_underlay"): links[host_id].guest_ip6,
                    # in the host's own namespace: its proxy answers on its LAN address
                    env_name("proxy_bind"): "0.0.0.0",
                },
                namespace=links[host_id].namespace,
                registry_etcd=cluster.endpoints,
            )
            for host_id in HOSTS
        }
        replicas = [ApiReplicaProcess(base / f"api{n}", cluster.endpoints, env) for n in (0, 1)]
        try:
            for process in (*agents.values(), *replicas):
                process.start()
            yield Fleet(
                cluster, env, agents, replicas, stores, f"oci:{layout}:{SLEEPER_TAG}", links
            )
        finally:
            for process in (*replicas, *agents.values()):
                process.stop()
            for host_id in HOSTS:
                kill_vmms_under(base / host_id)
            stores.close()
