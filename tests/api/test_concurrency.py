"""Many clients of two orgs creating, updating, leasing and destroying machines at once, on
loopback; afterwards the store's invariants hold, read straight from its SQLite file."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from hangar.settings import DATABASE
from tests.api.helpers import unique
from tests.api.invariants import store_violations, unfinished_runs
from tests.fixtures.inprocess import InProcessServer

pytestmark = pytest.mark.slow

WORKERS_PER_ORG = 6
ROUNDS = 6
QUOTA = 7
QUIESCENCE_GUARD_S = 180.0


@dataclass
class Org:
    slug: str
    apps: list[str]
    token: str
    created: list[str] = field(default_factory=list)
    refused_by_quota: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, machine_id: str) -> None:
        with self.lock:
            self.created.append(machine_id)

    def some_machine(self, rng: random.Random) -> str | None:
        with self.lock:
            return rng.choice(self.created) if self.created else None


@dataclass
class Problems:
    found: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, response: httpx.Response, allowed: set[int], what: str) -> None:
        if response.status_code not in allowed:
            with self.lock:
                self.found.append(f"{what}: {response.status_code} {response.text[:200]}")


def make_org(api: httpx.Client, name: str) -> Org:
    slug = unique(name)
    assert api.post("/v1/orgs", json={"slug": slug}).status_code == 201
    assert api.put(f"/v1/orgs/{slug}/quotas", json={"machines": QUOTA}).status_code == 200
    apps = [unique(f"{name}-app") for _ in range(2)]
    for app in apps:
        assert api.post("/v1/apps", json={"app_name": app, "org_slug": slug}).status_code == 201
    token = api.post("/v1/tokens", json={"org_slug": slug}).json()["token"]
    return Org(slug, apps, token)


def worker(
    server: InProcessServer, org: Org, rival: Org, image: str, seed: int, problems: Problems
) -> None:
    rng = random.Random(seed)
    with server.client(org.token) as api:
        for round_number in range(ROUNDS):
            app = rng.choice(org.apps)
            base = f"/v1/apps/{app}/machines"
            config = {"image": image, "metadata": {"worker": str(seed)}}
            created = api.post(
                base,
                json={"name": f"w{seed}-{round_number}", "config": config, "skip_launch": True},
            )
            problems.expect(created, {200, 422}, "create")
            if created.status_code == 422:
                if created.json()["status"] == "quota_exceeded":
                    with org.lock:
                        org.refused_by_quota += 1
                continue
            machine_id = created.json()["id"]
            org.add(machine_id)
            machine = f"{base}/{machine_id}"
            problems.expect(
                api.post(f"{machine}/metadata/round", json={"value": str(round_number)}),
                {204, 409},
                "metadata",
            )
            lease = api.post(f"{machine}/lease", json={"ttl": 60})
            problems.expect(lease, {200, 409}, "lease")
            nonce = lease.json()["data"]["nonce"] if lease.status_code == 200 else ""
            headers = {"fly-machine-lease-nonce": nonce}
            update = {
                "config": {**config, "env": {"ROUND": str(round_number)}},
                "skip_launch": True,
            }
            problems.expect(
                api.post(machine, json=update, headers=headers), {200, 409, 412}, "update"
            )

            # A sibling's machine in the same org: contention, never an error.
            sibling = org.some_machine(rng)
            if sibling is not None:
                for sibling_app in org.apps:
                    target = f"/v1/apps/{sibling_app}/machines/{sibling}"
                    problems.expect(
                        api.post(f"{target}/lease", json={"ttl": 5}),
                        {200, 404, 409, 412},
                        "sibling lease",
                    )
                    problems.expect(api.get(target), {200, 404}, "sibling get")

            # The rival org's machines, by its app or by ours: as if they did not exist.
            stranger = rival.some_machine(rng)
            if stranger is not None:
                for path in (
                    f"/v1/apps/{rival.apps[0]}/machines/{stranger}",
                    f"/v1/apps/{app}/machines/{stranger}",
                ):
                    problems.expect(api.get(path), {404}, "rival get")
                    problems.expect(
                        api.delete(path, params={"force": "true"}), {404}, "rival destroy"
                    )
                    problems.expect(
                        api.post(f"{path}/lease", json={"ttl": 5}), {404}, "rival lease"
                    )

            if nonce:
                problems.expect(
                    api.delete(f"{machine}/lease", headers=headers), {200, 404, 409}, "release"
                )
            if rng.random() < 0.6:
                destroy = api.delete(machine, params={"force": str(rng.random() < 0.5).lower()})
                problems.expect(destroy, {200, 409, 412}, "destroy")


def wait_quiescent(server: InProcessServer) -> None:
    """A hang guard only: the agent finishes these runs in seconds."""
    deadline = time.monotonic() + QUIESCENCE_GUARD_S
    while unfinished_runs(server.home / DATABASE) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def orgs(api_server: InProcessServer) -> Iterator[tuple[Org, Org]]:
    with api_server.client() as api:
        yield make_org(api, "north"), make_org(api, "south")


def test_two_orgs_at_once_leave_the_store_consistent(
    api_server: InProcessServer, orgs: tuple[Org, Org], test_image: str
) -> None:
    north, south = orgs
    problems = Problems()
    jobs: list[tuple[Org, Org, int]] = [
        (org, rival, index + offset)
        for offset, (org, rival) in ((0, (north, south)), (100, (south, north)))
        for index in range(WORKERS_PER_ORG)
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [
            pool.submit(worker, api_server, org, rival, test_image, seed, problems)
            for org, rival, seed in jobs
        ]
        for future in futures:
            future.result()
    assert not problems.found, "\n".join(problems.found[:20])
    wait_quiescent(api_server)

    violations = store_violations(api_server.home / DATABASE, api_server.home / "machines")
    assert not violations, "\n".join(violations[:20])
    with api_server.client() as api:
        for org in (north, south):
            machines: list[dict[str, Any]] = []
            for app in org.apps:
                listed = api.get(f"/v1/apps/{app}/machines", params={"include_deleted": True})
                machines += listed.json()
            assert sorted(m["id"] for m in machines) == sorted(org.created), org.slug
            live = [m for m in machines if m["state"] != "destroyed"]
            assert len(live) <= QUOTA
            assert org.refused_by_quota > 0 or len(org.created) <= QUOTA
            usage = api.get(f"/v1/orgs/{org.slug}").json()["usage"]
            assert usage["machines"] == len(live)
