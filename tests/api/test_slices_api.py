"""Thin GPU slices through the Machines API: which tier a machine runs in, the 422s for a
slice or share that cannot be had (listing what exists), and quotas that count a slice as its
fraction of a GPU."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from hangar.api.services.platform import PlatformService
from hangar.api.services.quotas import OrgUsage
from hangar.errors import InsufficientCapacity, Unprocessable
from hangar.model.config import MachineConfig
from hangar.model.gpu import GpuRecord
from hangar.model.host import HostInfo
from hangar.scheduler import InMemoryClaimStore
from hangar.scheduler.machines import host_state
from tests.api.helpers import assert_fly_error, unique
from tests.api.test_quotas import quota_org


def create(api: httpx.Client, app: str, image: str, **guest: Any) -> httpx.Response:
    config = {"image": image, "guest": {"cpus": 1, "memory_mb": 256, **guest}}
    return api.post(f"/v1/apps/{app}/machines", json={"config": config, "skip_launch": True})


@pytest.fixture
def app(api: httpx.Client) -> str:
    name = unique("slices")
    assert api.post("/v1/apps", json={"app_name": name, "org_slug": "personal"}).status_code == 201
    return name


def test_machines_say_their_tier(api: httpx.Client, app: str, test_image: str) -> None:
    vm = create(api, app, test_image)
    assert vm.status_code == 200, vm.text
    assert vm.json()["tier"] == "vm"
    assert "tier" not in vm.json()["config"]["guest"]
    sandbox = create(api, app, test_image, tier="sandbox")
    assert sandbox.status_code == 200, sandbox.text
    assert sandbox.json()["tier"] == "sandbox"
    assert sandbox.json()["config"]["guest"]["tier"] == "sandbox"
    fetched = api.get(f"/v1/apps/{app}/machines/{sandbox.json()['id']}").json()
    assert fetched["tier"] == "sandbox"


@pytest.mark.parametrize(
    ("guest", "words"),
    [
        # a profile the kind does not have: its profiles are listed
        (
            {"gpu_kind": "a100-sxm4-80gb", "gpu_slice": "1g.12gb"},
            ["gpu_slice", "1g.10gb", "3g.40gb", "7g.80gb"],
        ),
        # a kind without MIG: the kinds with MIG are listed
        ({"gpu_kind": "l40s", "gpu_slice": "1g.10gb"}, ["gpu_slice", "a100-sxm4-80gb", "h200"]),
        # a share on a kind the operator did not open to sharing
        ({"gpu_kind": "l40s", "gpu_share": 0.5}, ["gpu_share", "not open to GPU shares"]),
        ({"gpu_kind": "l40s", "gpu_share": 1.5}, ["gpu_share"]),
        ({"gpu_kind": "l40s", "gpu_share": 0.0001}, ["gpu_share"]),
        ({"gpu_share": 0.5}, ["gpu_kind is required"]),
        ({"gpu_kind": "h100-sxm", "gpu_slice": "bogus"}, ["gpu_slice", "MIG profile"]),
        (
            {"gpu_kind": "h100-sxm", "gpu_slice": "1g.10gb", "gpus": 1},
            ["leave out gpus"],
        ),
        (
            {"gpu_kind": "h100-sxm", "gpu_slice": "1g.10gb", "gpu_share": 0.5},
            ["not both"],
        ),
        ({"gpu_kind": "h100-sxm", "gpu_share": 0.5, "tier": "vm"}, ["sandbox tier"]),
        ({"tier": "container"}, ["tier"]),
        # a slice that exists, on a platform with no MIG host: no room, nothing made
        ({"gpu_kind": "h100-sxm", "gpu_slice": "1g.10gb"}, ["1g.10gb MIG slice"]),
    ],
)
def test_slices_that_cannot_be_had_are_422s_and_make_nothing(
    api: httpx.Client, app: str, test_image: str, guest: dict[str, Any], words: list[str]
) -> None:
    assert_fly_error(create(api, app, test_image, **guest), 422, *words)
    assert api.get(f"/v1/apps/{app}/machines").json() == []


def test_sandbox_machines_check_their_mounts_as_vms_do(
    api: httpx.Client, app: str, test_image: str
) -> None:
    """Sandbox machines mount volumes (the host mounts them): a missing one is refused as a
    VM's is, for the volume, not for the tier."""
    answers = []
    for guest in ({"tier": "sandbox"}, {}):
        config = {
            "image": test_image,
            "guest": guest,
            "mounts": [{"volume": "vol_0000000000000001", "path": "/data"}],
        }
        response = api.post(f"/v1/apps/{app}/machines", json={"config": config})
        body = assert_fly_error(response, 422, "config.mounts", "vol_0000000000000001")
        assert "tier" not in body["error"]
        answers.append(body["error"])
    assert answers[0] == answers[1]
    assert api.get(f"/v1/apps/{app}/machines").json() == []


def test_a_slice_counts_as_its_fraction_of_a_gpu_in_quotas(
    api: httpx.Client, test_image: str
) -> None:
    org, app = quota_org(api, gpus={"h100-sxm": 0})
    body = assert_fly_error(
        create(api, app, test_image, gpu_kind="h100-sxm", gpu_slice="1g.10gb"),
        422,
        "quota gpus.h100-sxm",
        "would make 0.142",
    )
    assert body["status"] == "quota_exceeded"
    assert_fly_error(
        create(api, app, test_image, gpu_kind="h100-sxm", gpu_share=0.25),
        422,
        "would make 0.25",
    )
    usage = OrgUsage()
    for guest in (
        {"gpu_kind": "h100-sxm", "gpu_slice": "3g.40gb"},
        {"gpu_kind": "h100-sxm", "gpu_share": 0.25},
        {"gpu_kind": "h100-sxm", "gpus": 1, "cpu_kind": "performance"},
    ):
        usage.add(MachineConfig.model_validate({"image": test_image, "guest": guest}))
    assert usage.gpu_totals() == {"h100-sxm": 1.678}
    assert usage.counters()["gpu_parts.h100-sxm"] == 678
    assert org


def test_a_kind_opened_to_shares_is_admitted_where_a_gpu_has_room() -> None:
    claims = InMemoryClaimStore()
    host = HostInfo(id="h1", region="local", cpus=8, memory_mb=16384)
    gpu = GpuRecord(host_id="h1", bdf="0000:18:00.0", kind="l40s", iommu_group=1)
    claims.put_host(host_state(host, [gpu]))
    share = MachineConfig.model_validate(
        {"image": "oci:/x:latest", "guest": {"gpu_kind": "l40s", "gpu_share": 0.5}}
    )
    PlatformService(claims, share_kinds=frozenset({"l40s"})).admit_gpu_part(share, "local")
    with pytest.raises(Unprocessable, match="kinds open to shares: l40s"):
        PlatformService(claims, share_kinds=frozenset({"l40s"})).admit_gpu_part(
            share.model_copy(update={"guest": share.guest.model_copy(update={"gpu_kind": "a10"})}),
            "local",
        )
    with pytest.raises(InsufficientCapacity):
        PlatformService(claims, share_kinds=frozenset({"l40s"})).admit_gpu_part(share, "fra")
