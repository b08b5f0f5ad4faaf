"""A fleet with real processes: etcd (3 members), two agents (each in a network namespace of
its own), two API replicas.

Scenarios: a machine created through one replica boots on an agent host; two replicas racing
for the last GPU of a fixture GPU host (exactly one wins); an agent killed with SIGKILL (its
machines unreachable within the lease TTL plus 5 s, nothing placed there meanwhile, nothing
started twice, reconciled on return, the repair in the audit log); a host's link cut and
restored; cordon and drain; one etcd member stopped (service goes on), two stopped
(mutating calls answer a Fly-shaped 503 and leave nothing behind), and convergence once quorum
is back; guest operations through a replica relayed to the machine's host (exec, ps, signal,
the console, a volume made and deleted), the relay refusing anything without the fleet's
credential, and a stopped agent's machine answering 503. The fleet's invariants are checked
after every scenario.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from hangar.agent.guest import find_vmm_processes
from hangar.clock import SystemClock
from hangar.fleet.invariants import fleet_violations
from hangar.fleet.relay import NONCE_HEADER, SIGNATURE_HEADER, TIME_HEADER, RelayCredential
from hangar.model.host import HostInfo
from hangar.scheduler import Claim
from hangar.settings import env_name
from hangar.store.etcd.hosts import HostLease, HostRecord, decode_host_record
from hangar.store.etcd.sealed import KEY_BYTES, Sealer
from tests.fleet.conftest import HOSTS, LEASE_TTL_S, REGION, Fleet
from tests.scheduler.fleet import gpu_host

T = TypeVar("T")
POLL_S = 0.1
BOOT_WAIT_S = 60


def until(what: str, check: Callable[[], T | None], timeout_s: float) -> T:
    """Poll ``check`` until it returns something, at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(POLL_S)


def assert_invariants(fleet: Fleet) -> None:
    assert fleet_violations(fleet.stores.machines, fleet.stores.claims) == []


def new_app(fleet: Fleet, prefix: str) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    with fleet.api(0) as api:
        response = api.post("/v1/apps", json={"app_name": name, "org_slug": "personal"})
    assert response.status_code == 201, response.text
    return name


def wait_state(api: httpx.Client, app: str, machine_id: str, state: str) -> None:
    for _ in range(3):  # a first boot may build the rootfs: up to three waits of 60 s
        response = api.get(
            f"/v1/apps/{app}/machines/{machine_id}/wait",
            params={"state": state, "timeout": BOOT_WAIT_S},
        )
        if response.status_code == 200:
            return
        assert response.status_code == 408, response.text
    raise AssertionError(f"machine {machine_id} never reached {state}")


def machine_view(api: httpx.Client, app: str, machine_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/apps/{app}/machines/{machine_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def published_free_memory(fleet: Fleet, host_id: str, holder: str) -> bool:
    """The host's lease registration says as much memory free as its claim record leaves,
    with ``holder``'s claim in it."""
    kv = fleet.stores.client.get(fleet.stores.layout.host(host_id))
    claims = fleet.stores.claims.read_host(host_id)
    if kv is None or claims is None:
        return False
    state = claims.state
    free = state.memory_mb - sum(claim.memory_mb for claim in state.claims)
    holds = any(claim.machine_id == holder for claim in state.claims)
    return holds and decode_host_record(kv).free_memory_mb == free


@pytest.mark.slow
def test_a_machine_created_through_one_replica_boots_on_an_agent_host(fleet: Fleet) -> None:
    app = new_app(fleet, "boot")
    with fleet.api(0) as first, fleet.api(1) as second:
        # A secret set through one replica: sealed in etcd, listed by the other, and in the
        # environment of the machine another host's agent boots.
        value = f"fleet-secret-{secrets.token_hex(4)}"
        put = second.post(f"/v1/apps/{app}/secrets/FLEET_SECRET", json={"value": value})
        assert put.status_code in (200, 201), put.text
        listed = first.get(f"/v1/apps/{app}/secrets").json()
        assert "FLEET_SECRET" in json.dumps(listed) and value not in json.dumps(listed)
        config = {
            "image": fleet.sleeper_image,
            "init": {"cmd": ["sh", "-c", 'echo "secret=$FLEET_SECRET"; sleep 3600']},
        }
        created = first.post(f"/v1/apps/{app}/machines", json={"config": config})
        assert created.status_code == 200, created.text
        machine_id = created.json()["id"]
        wait_state(second, app, machine_id, "started")  # woken by the other replica's watch
        record = fleet.stores.machines.get_machine(machine_id)
        assert record is not None and record.host_id in HOSTS
        agent = fleet.agents[record.host_id]
        assert machine_id in find_vmm_processes(agent.home / "machines").values()
        console_log = agent.home / "machines" / machine_id / "console.log"
        until(
            "the guest printing its app's secret",
            lambda: (
                True
                if console_log.exists()
                and f"secret={value}" in console_log.read_text(errors="replace")
                else None
            ),
            120,
        )
        view = machine_view(second, app, machine_id)
        assert view["host_status"] == "ok" and view["state"] == "started"
        until(
            "the host's registration showing the machine's claim taken from what is free",
            lambda: True if published_free_memory(fleet, record.host_id, machine_id) else None,
            LEASE_TTL_S * 3,
        )
        assert any(e["source"] == "flyd" and e["status"] == "started" for e in view["events"])
        # the runs the agent recorded in its SQLite and published, read on another process
        until(
            "the create run published as succeeded",
            lambda: (
                True
                if any(
                    run["status"] == "succeeded"
                    for run in second.get(f"/v1/apps/{app}/machines/{machine_id}/runs").json()
                )
                else None
            ),
            10,
        )
        stopped = second.post(f"/v1/apps/{app}/machines/{machine_id}/stop", json={})
        assert stopped.status_code == 200, stopped.text
        wait_state(first, app, machine_id, "stopped")
        until(
            "the VMM gone",
            lambda: (
                True
                if machine_id not in find_vmm_processes(agent.home / "machines").values()
                else None
            ),
            30,
        )
    assert_invariants(fleet)


CHECK_SCRIPT = r"""
check() {
	name=$1 tries=$2
	shift 2
	i=0
	while [ $i -lt $tries ]; do
		if out=$("$@" 2>&1); then
			echo "fleet-check $name ok $(echo $out | tr '\n' ' ')"
			return
		fi
		i=$((i + 1))
		sleep 1
	done
	echo "fleet-check $name failed $(echo $out | tr '\n' ' ')"
}
"""
CHECK_LINE = re.compile(r"^fleet-check (\S+) (ok|failed)(.*)$", re.MULTILINE)
WEB_PORT = 8080
PROXY_PORT = 80
FETCH = "timeout -s KILL 4 wget -q -O -"


def create_on(fleet: Fleet, api: httpx.Client, app: str, host_id: str, config: Any) -> str:
    """A machine of ``app`` placed on ``host_id`` (the other hosts cordoned meanwhile)."""
    others = [other for other in HOSTS if other != host_id]
    for other in others:
        assert api.post(f"/v1/hosts/{other}/cordon").status_code == 200
    try:
        created = api.post(f"/v1/apps/{app}/machines", json={"config": config})
    finally:
        for other in others:
            assert api.post(f"/v1/hosts/{other}/uncordon").status_code == 200
    assert created.status_code == 200, created.text
    machine_id: str = created.json()["id"]
    record = fleet.stores.machines.get_machine(machine_id)
    assert record is not None and record.host_id == host_id
    return machine_id


def guest_checks(fleet: Fleet, host_id: str, machine_id: str, names: set[str]) -> dict[str, str]:
    """``names``' ``fleet-check`` lines from the guest's console: check name -> ``ok ...`` or
    ``failed ...``."""
    console_log = fleet.agents[host_id].home / "machines" / machine_id / "console.log"

    def found() -> dict[str, str] | None:
        if not console_log.exists():
            return None
        text = console_log.read_text(errors="replace").replace("\r", "")
        lines = {m.group(1): f"{m.group(2)}{m.group(3)}" for m in CHECK_LINE.finditer(text)}
        return lines if names <= lines.keys() else None

    return until(f"checks {sorted(names)} of {machine_id}", found, 180)


def proxy_fetch(address: str, app: str) -> str | None:
    """The page the proxy at ``address`` answers for ``app`` (None: not yet)."""
    try:
        response = httpx.get(
            f"http://{address}:{PROXY_PORT}/", headers={"host": f"{app}.localhost"}, timeout=5
        )
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def in_host(fleet: Fleet, host_id: str, *argv: str) -> str:
    done = subprocess.run(
        fleet.links[host_id].command(*argv), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_guests_reach_their_org_on_other_hosts_and_no_other_org(fleet: Fleet) -> None:
    """The private network spans hosts: a guest on h2 reaches its org's web server on h1 by its
    ``.internal`` name and address (routed over the LAN between the hosts), h3 itself reaches
    it, h2's proxy serves the app from it, and a guest of another org on h3 can neither
    resolve nor reach it (the routed packets are counted as blocked)."""
    web_host, client_host, other_host = HOSTS
    web_app, client_app = new_app(fleet, "netweb"), new_app(fleet, "netcli")
    other_org = f"other-{secrets.token_hex(3)}"
    machines: list[tuple[str, str]] = []
    with fleet.api(0) as api:
        assert api.post("/v1/orgs", json={"slug": other_org}).status_code == 201
        other_app = f"netoth-{secrets.token_hex(3)}"
        created = api.post("/v1/apps", json={"app_name": other_app, "org_slug": other_org})
        assert created.status_code == 201, created.text
        try:
            web = create_on(
                fleet,
                api,
                web_app,
                web_host,
                {
                    "image": fleet.sleeper_image,
                    "init": {
                        "cmd": [
                            "sh",
                            "-c",
                            "mkdir -p /www && echo fleet-web-page > /www/index.html && "
                            f"exec httpd -f -p {WEB_PORT} -h /www",
                        ]
                    },
                    "services": [
                        {
                            "protocol": "tcp",
                            "internal_port": WEB_PORT,
                            "ports": [{"port": PROXY_PORT, "handlers": ["http"]}],
                        }
                    ],
                },
            )
            machines.append((web_app, web))
            wait_state(api, web_app, web, "started")
            web_ip = machine_view(api, web_app, web)["private_ip"]
            web_name = f"{web}.vm.{web_app}.internal"
            client_script = (
                CHECK_SCRIPT
                + f"check lookup 20 nslookup -type=AAAA {web_name}\n"
                + f"check fetch_by_name 20 {FETCH} http://{web_name}:{WEB_PORT}/\n"
                + f"check fetch_by_address 5 {FETCH} http://[{web_ip}]:{WEB_PORT}/\n"
                + "sleep 3600\n"
            )
            client = create_on(
                fleet,
                api,
                client_app,
                client_host,
                {"image": fleet.sleeper_image, "init": {"cmd": ["sh", "-c", client_script]}},
            )
            machines.append((client_app, client))
            checks = guest_checks(
                fleet, client_host, client, {"lookup", "fetch_by_name", "fetch_by_address"}
            )
            assert checks["lookup"].startswith("ok") and web_ip in checks["lookup"], checks
            for name in ("fetch_by_name", "fetch_by_address"):
                assert checks[name].startswith("ok") and "fleet-web-page" in checks[name], checks

            # The third host routes the web's /64 to the first host, and reaches the guest.
            web_prefix = str(ipaddress.IPv6Network(f"{web_ip}/64", strict=False))
            until(
                "the route to the web's /64 on the third host",
                lambda: (
                    True
                    if web_prefix
                    in in_host(fleet, other_host, "ip", "-6", "route", "show", "proto", "152")
                    else None
                ),
                30,
            )
            fetch = (
                "import urllib.request, sys; "
                "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
            )
            page = in_host(
                fleet, other_host, sys.executable, "-c", fetch, f"http://[{web_ip}]:{WEB_PORT}/"
            )
            assert "fleet-web-page" in page

            # The second host's proxy serves the app from the first host's machine.
            proxied = until(
                "the web page through another host's proxy",
                lambda: proxy_fetch(fleet.links[client_host].guest_ip, web_app),
                30,
            )
            assert "fleet-web-page" in proxied

            # Another org's guest on the third host: no name, no route through.
            other_script = (
                CHECK_SCRIPT
                + f"check lookup 1 nslookup -type=AAAA {web_name}\n"
                + f"check fetch_by_address 2 {FETCH} http://[{web_ip}]:{WEB_PORT}/\n"
                + "sleep 3600\n"
            )
            other = create_on(
                fleet,
                api,
                other_app,
                other_host,
                {"image": fleet.sleeper_image, "init": {"cmd": ["sh", "-c", other_script]}},
            )
            machines.append((other_app, other))
            checks = guest_checks(fleet, other_host, other, {"lookup", "fetch_by_address"})
            assert checks["lookup"].startswith("failed"), checks
            assert checks["fetch_by_address"].startswith("failed"), checks
            table = fleet.env[env_name("net_table")]
            counters = in_host(
                fleet, other_host, "nft", "list", "counter", "inet", table, "routed_blocked"
            )
            assert int(re.findall(r"packets (\d+)", counters)[0]) > 0, counters
        finally:
            for app, machine_id in machines:
                api.delete(f"/v1/apps/{app}/machines/{machine_id}", params={"force": "true"})
            for app, machine_id in machines:
                wait_state(api, app, machine_id, "destroyed")
    assert_invariants(fleet)


def test_two_replicas_racing_for_the_last_gpu_exactly_one_wins(fleet: Fleet) -> None:
    host_id = f"gpu-{secrets.token_hex(3)}"
    fleet.stores.claims.put_host(gpu_host(host_id, kind="l40s", gpus=1, region=REGION))
    record = HostRecord(
        host=HostInfo(id=host_id, region=REGION, cpus=128, memory_mb=1024 * 1024),
        pool="gpu",
    )
    app = new_app(fleet, "race")
    config = {
        "image": fleet.sleeper_image,
        "guest": {"cpu_kind": "performance", "cpus": 1, "gpus": 1, "gpu_kind": "l40s"},
    }
    with HostLease(fleet.stores.client, record, fleet.stores.layout, ttl_s=LEASE_TTL_S):
        clients = [fleet.api(0), fleet.api(1)]
        for api in clients:
            until(
                "the fixture GPU host seen",
                lambda api=api: (
                    True if any(h["id"] == host_id for h in api.get("/v1/hosts").json()) else None
                ),
                10,
            )
        answers: list[httpx.Response | None] = [None, None]
        barrier = threading.Barrier(2)

        def create(number: int) -> None:
            barrier.wait(timeout=10)
            answers[number] = clients[number].post(
                f"/v1/apps/{app}/machines", json={"config": config}
            )

        threads = [threading.Thread(target=create, args=(n,)) for n in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for api in clients:
            api.close()
    statuses = sorted(answer.status_code for answer in answers if answer is not None)
    assert statuses == [200, 422], [a.text for a in answers if a is not None]
    winner = next(a for a in answers if a is not None and a.status_code == 200).json()["id"]
    loser = next(a for a in answers if a is not None and a.status_code == 422).json()
    assert "insufficient" in loser["error"]
    claims = fleet.stores.claims.read_host(host_id)
    assert claims is not None
    assert [(c.machine_id, len(c.gpu_indexes)) for c in claims.state.claims] == [(winner, 1)]
    assert [m.id for m in fleet.stores.machines.list_machines(app)] == [winner]
    assert_invariants(fleet)


@pytest.mark.slow
def test_a_killed_agent_goes_unreachable_and_reconciles_on_return(fleet: Fleet) -> None:
    app = new_app(fleet, "kill")
    with fleet.api(0) as first, fleet.api(1) as second:
        created = first.post(
            f"/v1/apps/{app}/machines", json={"config": {"image": fleet.sleeper_image}}
        )
        assert created.status_code == 200, created.text
        machine_id = created.json()["id"]
        wait_state(first, app, machine_id, "started")
        record = fleet.stores.machines.get_machine(machine_id)
        assert record is not None
        agent = fleet.agents[record.host_id]
        vmms = find_vmm_processes(agent.home / "machines")
        assert list(vmms.values()) == [machine_id]

        agent.kill()
        killed_at = time.monotonic()
        until(
            "host_status unreachable",
            lambda: (
                True
                if machine_view(second, app, machine_id)["host_status"] == "unreachable"
                else None
            ),
            LEASE_TTL_S + 10,
        )
        assert time.monotonic() - killed_at <= LEASE_TTL_S + 5
        assert machine_view(second, app, machine_id)["incomplete_config"]["image"]
        # nothing is placed on the lost host meanwhile, and its guest keeps running
        other = second.post(
            f"/v1/apps/{app}/machines",
            json={"config": {"image": fleet.sleeper_image}, "skip_launch": True},
        )
        assert other.status_code == 200, other.text
        placed = fleet.stores.machines.get_machine(other.json()["id"])
        assert placed is not None and placed.host_id != record.host_id
        assert find_vmm_processes(agent.home / "machines") == vmms

        # etcd drifts while the host is away: a claim no machine of this host owns
        ghost = f"ghost-{secrets.token_hex(3)}"
        host_claims = fleet.stores.claims.read_host(record.host_id)
        assert host_claims is not None
        drifted = host_claims.state.with_claim(Claim(ghost, 1000, 64))
        assert fleet.stores.claims.compare_and_set(record.host_id, host_claims.version, drifted)

        agent.start()  # the same host, its own SQLite: reconciles and registers again
        until(
            "host_status ok again",
            lambda: True if machine_view(first, app, machine_id)["host_status"] == "ok" else None,
            30,
        )
        view = machine_view(first, app, machine_id)
        assert view["state"] == "started"
        assert find_vmm_processes(agent.home / "machines") == vmms  # not started twice
        starts = [e for e in view["events"] if e["source"] == "flyd" and e["status"] == "started"]
        assert len(starts) == 1
        # the host's SQLite won: the drifted claim is gone, and the operator can see why
        repaired = fleet.stores.claims.read_host(record.host_id)
        assert repaired is not None
        assert ghost not in {claim.machine_id for claim in repaired.state.claims}
        audit = second.get("/v1/audit", params={"limit": 50}).json()["records"]
        assert any(
            r["action"] == "reconcile_release_stale_claim" and r["machine_id"] == ghost
            for r in audit
        ), audit
        destroyed = first.delete(f"/v1/apps/{app}/machines/{machine_id}", params={"force": "true"})
        assert destroyed.status_code == 200, destroyed.text
        wait_state(second, app, machine_id, "destroyed")
    assert_invariants(fleet)


def test_etcd_member_loss_then_quorum_loss_then_convergence(fleet: Fleet) -> None:
    app = new_app(fleet, "quorum")
    body = {"config": {"image": fleet.sleeper_image}, "skip_launch": True}
    cluster = fleet.cluster
    with fleet.api(0) as first, fleet.api(1) as second:
        cluster.stop_member(0)
        try:
            for api in (first, second):
                created = api.post(f"/v1/apps/{app}/machines", json=body)
                assert created.status_code == 200, created.text
        finally:
            cluster.start_member(0)
            cluster.wait_healthy()
        before = {m.id for m in fleet.stores.machines.list_machines(app)}
        assert len(before) == 2
        known = next(iter(before))

        cluster.stop_member(1)
        cluster.stop_member(2)
        try:
            refused = first.post(f"/v1/apps/{app}/machines", json=body)
            assert refused.status_code == 503, refused.text
            assert set(refused.json()) >= {"error", "status"}
            still = second.get(f"/v1/apps/{app}/machines/{known}")  # what is known still reads
            assert still.status_code == 200, still.text
        finally:
            cluster.start_member(1)
            cluster.start_member(2)
            cluster.wait_healthy()
        assert {m.id for m in fleet.stores.machines.list_machines(app)} == before

        def created_again() -> str | None:
            response = second.post(f"/v1/apps/{app}/machines", json=body)
            return str(response.json()["id"]) if response.status_code == 200 else None

        fresh = until("a create once quorum is back", created_again, 30)
        assert {m.id for m in fleet.stores.machines.list_machines(app)} == before | {fresh}
    assert_invariants(fleet)


def hangar_cli(fleet: Fleet, *args: str) -> dict[str, Any]:
    """The ``hangar`` command against the second replica, as an operator would run it."""
    env = {
        **os.environ,
        env_name("api_url"): fleet.replicas[1].url,
        env_name("api_token"): fleet.replicas[0].operator_token,
    }
    done = subprocess.run(
        [sys.executable, "-m", "hangar.cli.main", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_cordon_steers_placement_and_drain_recreates_stopped_machines(fleet: Fleet) -> None:
    app = new_app(fleet, "drain")
    body = {"config": {"image": fleet.sleeper_image}, "skip_launch": True}
    first_host, *others = HOSTS
    for other in others:
        assert hangar_cli(fleet, "host", "cordon", other)["by"]
    try:
        with fleet.api(0) as api:
            names = [f"keep-{n}" for n in (0, 1)]
            old = []
            for name in names:
                created = api.post(f"/v1/apps/{app}/machines", json={**body, "name": name})
                assert created.status_code == 200, created.text
                old.append(created.json()["id"])
            hosts = {m.id: m.host_id for m in fleet.stores.machines.list_machines(app)}
            assert set(hosts.values()) == {first_host}  # the cordoned hosts took none
    finally:
        for other in others:
            assert hangar_cli(fleet, "host", "uncordon", other)["ok"]

    report = hangar_cli(fleet, "host", "drain", first_host)
    try:
        # (other scenarios' machines on that host are moved or left too; these two must move)
        ours = [moved for moved in report["moved"] if moved["machine_id"] in old]
        assert sorted(moved["machine_id"] for moved in ours) == sorted(old), report
        assert {moved["host_id"] for moved in report["moved"]} <= set(others)
        with fleet.api(1) as api:
            for moved in ours:
                wait_state(api, app, moved["machine_id"], "destroyed")
                view = machine_view(api, app, moved["new_machine_id"])
                assert any(e["type"] == "drain" for e in view["events"])
            live = api.get(f"/v1/apps/{app}/machines").json()
            assert sorted(m["name"] for m in live) == names
            placed = api.post(f"/v1/apps/{app}/machines", json=body)  # first host is cordoned
            assert placed.status_code == 200, placed.text
            record = fleet.stores.machines.get_machine(placed.json()["id"])
            assert record is not None and record.host_id in others
    finally:
        hangar_cli(fleet, "host", "uncordon", first_host)
    assert_invariants(fleet)


def ip_link(interface: str, state: str) -> None:
    subprocess.run(["ip", "link", "set", interface, state], check=True, timeout=10)


@pytest.mark.slow
def test_a_host_cut_off_goes_unreachable_and_rejoins_when_its_link_returns(fleet: Fleet) -> None:
    app = new_app(fleet, "link")
    *kept, cut = HOSTS
    with fleet.api(0) as api:
        for host_id in kept:
            assert api.post(f"/v1/hosts/{host_id}/cordon").status_code == 200
        try:
            created = api.post(
                f"/v1/apps/{app}/machines",
                json={"config": {"image": fleet.sleeper_image}, "skip_launch": True},
            )
        finally:
            for host_id in kept:
                assert api.post(f"/v1/hosts/{host_id}/uncordon").status_code == 200
        assert created.status_code == 200, created.text
        machine_id = created.json()["id"]
        record = fleet.stores.machines.get_machine(machine_id)
        assert record is not None and record.host_id == cut

        link = fleet.links[cut]
        ip_link(link.host_interface, "down")  # the host's only way to etcd
        try:
            cut_at = time.monotonic()
            until(
                "host_status unreachable",
                lambda: (
                    True
                    if machine_view(api, app, machine_id)["host_status"] == "unreachable"
                    else None
                ),
                LEASE_TTL_S + 10,
            )
            assert time.monotonic() - cut_at <= LEASE_TTL_S + 5
            hosts = {host["id"] for host in api.get("/v1/hosts").json()}
            assert cut not in hosts and set(kept) <= hosts
        finally:
            ip_link(link.host_interface, "up")
        until(
            "the host registered again",
            lambda: True if machine_view(api, app, machine_id)["host_status"] == "ok" else None,
            30,
        )
        # the host takes work again: a start addressed to it runs there
        started = api.post(f"/v1/apps/{app}/machines/{machine_id}/start")
        assert started.status_code == 200, started.text
        wait_state(api, app, machine_id, "started")
        stopped = api.post(f"/v1/apps/{app}/machines/{machine_id}/stop", json={})
        assert stopped.status_code == 200, stopped.text
        wait_state(api, app, machine_id, "stopped")
    assert_invariants(fleet)


# ---- the relay: guest operations through a replica, run by the machine's host -----------

RELAY_SCRIPT = 'trap "echo got-usr1" USR1; echo relay-up; while true; do sleep 1; done'


def registered(fleet: Fleet, host_id: str) -> HostRecord:
    kv = fleet.stores.client.get(fleet.stores.layout.host(host_id))
    assert kv is not None, f"host {host_id} is not registered"
    return decode_host_record(kv)


def console_text(api: httpx.Client, app: str, machine_id: str) -> str:
    response = api.get(f"/v1/apps/{app}/machines/{machine_id}/logs")
    assert response.status_code == 200, response.text
    return response.text.replace("\r\n", "\n")


@pytest.mark.slow
def test_guest_operations_through_each_replica_run_on_the_machines_host(fleet: Fleet) -> None:
    """One machine, on a volume made, extended and snapshotted through replicas: exec through
    both replicas, ps, a signal its init traps, its console; then the volume deleted through a
    replica."""
    app = new_app(fleet, "relay")
    with fleet.api(0) as first, fleet.api(1) as second:
        made = second.post(
            f"/v1/apps/{app}/volumes",
            json={"name": "data", "size_gb": 1, "encrypted": False, "region": REGION},
        )
        assert made.status_code == 200, made.text
        volume = made.json()
        assert volume["state"] == "created", volume
        stored = fleet.stores.volumes.get_volume(volume["id"])
        assert stored is not None and stored.host_id in HOSTS
        agent = fleet.agents[stored.host_id]
        assert list((agent.home / "volumes").rglob(f"{volume['id']}*")), "no image on the host"
        # Its runs (extend, snapshot) go to its host's agent through the work queue.
        extended = first.put(f"/v1/apps/{app}/volumes/{volume['id']}/extend", json={"size_gb": 2})
        assert extended.status_code == 200, extended.text
        assert extended.json()["volume"]["size_gb"] == 2
        snapshot = second.post(f"/v1/apps/{app}/volumes/{volume['id']}/snapshots")
        assert snapshot.status_code == 200, snapshot.text
        listed = first.get(f"/v1/apps/{app}/volumes/{volume['id']}/snapshots")
        assert [s["id"] for s in listed.json()] == [snapshot.json()["id"]], listed.text

        config = {
            "image": fleet.sleeper_image,
            "init": {"cmd": ["sh", "-c", RELAY_SCRIPT]},
            "mounts": [{"volume": volume["id"], "path": "/data"}],
        }
        created = first.post(f"/v1/apps/{app}/machines", json={"config": config})
        assert created.status_code == 200, created.text
        machine_id = created.json()["id"]
        base = f"/v1/apps/{app}/machines/{machine_id}"
        record = fleet.stores.machines.get_machine(machine_id)
        assert record is not None and record.host_id == stored.host_id  # where its volume is
        wait_state(first, app, machine_id, "started")
        try:
            until(
                "the guest's first line, read through a replica",
                lambda: True if "relay-up" in console_text(second, app, machine_id) else None,
                120,
            )
            for number, api in enumerate((first, second)):
                word = f"through-replica-{number}"
                ran = api.post(
                    f"{base}/exec",
                    json={"command": ["sh", "-c", f"echo {word} > /data/f; cat /data/f"]},
                )
                assert ran.status_code == 200, ran.text
                answer = ran.json()
                assert answer["exit_code"] == 0 and answer["stdout"] == f"{word}\n", answer
            failing = first.post(f"{base}/exec", json={"command": ["sh", "-c", "exit 3"]})
            assert failing.status_code == 200 and failing.json()["exit_code"] == 3

            listed = second.get(f"{base}/ps", params={"sort_by": "pid"})
            assert listed.status_code == 200, listed.text
            assert any("sleep" in " ".join(p["argv"] or [p["command"]]) for p in listed.json())
            refused = second.get(f"{base}/ps", params={"sort_by": "bogus"})  # the host's 400
            assert refused.status_code == 400 and "sort_by" in refused.json()["error"]

            def signalled() -> bool | None:
                sent = first.post(f"{base}/signal", json={"signal": "SIGUSR1"})
                if sent.status_code == 412:  # the guest's signal port not up yet: retryable
                    return None
                assert sent.status_code == 200, sent.text
                return True

            until("the signal delivered", signalled, 60)
            until(
                "the trap's line on the console",
                lambda: True if "got-usr1" in console_text(second, app, machine_id) else None,
                60,
            )
            events = second.get(f"{base}/events").json()
            assert any(e["type"] == "signal" for e in events), events
            bad = second.post(f"{base}/signal", json={"signal": "SIGBOGUS"})
            assert bad.status_code == 422, bad.text
        finally:
            destroyed = first.delete(base, params={"force": "true"})
            assert destroyed.status_code == 200, destroyed.text
            wait_state(second, app, machine_id, "destroyed")
        stopped_exec = second.post(f"{base}/exec", json={"command": ["true"]})
        assert stopped_exec.status_code == 412, stopped_exec.text  # the host's own answer

        def deleted() -> dict[str, Any] | None:
            response = first.delete(f"/v1/apps/{app}/volumes/{volume['id']}")
            if response.status_code == 409:  # still being let go by the destroy
                return None
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        assert until("the volume deleted", deleted, 60)["state"] == "destroyed"
    until(
        "the fleet consistent",
        lambda: fleet_violations(fleet.stores.machines, fleet.stores.claims) == [] or None,
        20,
    )


def test_the_relay_refuses_requests_without_the_fleets_credential(fleet: Fleet) -> None:
    address = registered(fleet, HOSTS[0]).address
    assert address.startswith("http://"), address
    path = "/relay/v1/apps/any/machines/any/exec"
    body = {"command": ["true"]}
    with httpx.Client(base_url=address, timeout=10, trust_env=False) as client:
        missing = client.post(path, json=body)
        assert missing.status_code == 401, missing.text
        forged = client.post(
            path,
            json=body,
            headers={
                TIME_HEADER: f"{time.time():.3f}",
                NONCE_HEADER: secrets.token_hex(16),
                SIGNATURE_HEADER: secrets.token_hex(32),
            },
        )
        assert forged.status_code == 401, forged.text
        assert "credential" in forged.json()["error"]
        # signed with another key: as good as forged
        stranger = RelayCredential.of(Sealer([secrets.token_bytes(KEY_BYTES)]), SystemClock())
        request = client.build_request("POST", path, json=body)
        target = request.url.raw_path.decode()
        request.headers.update(stranger.sign("POST", target, request.content))
        assert client.send(request).status_code == 401
        # signed with the fleet's key: let through, to the host's own answer (no such app)
        key_file = Path(fleet.env[env_name("etcd_key_file")])
        member = RelayCredential.of(Sealer.from_key_files([key_file]), SystemClock())
        request = client.build_request("POST", path, json=body)
        request.headers.update(member.sign("POST", target, request.content))
        answer = client.send(request)
        assert answer.status_code == 404, answer.text
        assert client.send(request).status_code == 401  # the same request again: replayed


def test_a_gpus_log_and_release_through_a_replica_are_its_hosts_answers(fleet: Fleet) -> None:
    """A GPU's event log and its release from quarantine go to its host's agent: the host
    answers for a GPU it does not have (these hosts have none), as on one host."""
    host_id, bdf = HOSTS[0], "0000:99:00.0"
    with fleet.api(1) as api:
        events = api.get(f"/v1/hosts/{host_id}/gpus/{bdf}/events")
        assert events.status_code == 404, events.text
        assert host_id in events.json()["error"] and bdf in events.json()["error"]
        released = api.post(
            f"/v1/hosts/{host_id}/gpus/{bdf}/release", json={"reason": "reseated the board"}
        )
        assert released.status_code == 404, released.text
        refused = api.post(f"/v1/hosts/{host_id}/gpus/{bdf}/release", json={})
        assert refused.status_code == 422, refused.text  # checked at the replica first


def test_a_stopped_agents_machine_answers_503_naming_its_host(fleet: Fleet) -> None:
    app = new_app(fleet, "gone")
    with fleet.api(0) as api:
        created = api.post(
            f"/v1/apps/{app}/machines",
            json={"config": {"image": fleet.sleeper_image}, "skip_launch": True},
        )
        assert created.status_code == 200, created.text
        machine_id = created.json()["id"]
        record = fleet.stores.machines.get_machine(machine_id)
        assert record is not None
        agent = fleet.agents[record.host_id]
        agent.stop()  # its lease is revoked: the host leaves the registrations at once
        try:
            until(
                "host_status unreachable",
                lambda: (
                    True
                    if machine_view(api, app, machine_id)["host_status"] == "unreachable"
                    else None
                ),
                LEASE_TTL_S + 10,
            )
            base = f"/v1/apps/{app}/machines/{machine_id}"
            for answer in (
                api.post(f"{base}/exec", json={"command": ["true"]}),
                api.get(f"{base}/logs"),
                api.post(f"{base}/signal", json={"signal": "SIGUSR1"}),
            ):
                assert answer.status_code == 503, answer.text
                assert record.host_id in answer.json()["error"]
                assert answer.headers["retry-after"]
        finally:
            agent.start()
        destroyed = api.delete(f"/v1/apps/{app}/machines/{machine_id}")
        assert destroyed.status_code == 200, destroyed.text
        wait_state(api, app, machine_id, "destroyed")
    assert_invariants(fleet)
