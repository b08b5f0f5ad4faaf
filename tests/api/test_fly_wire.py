"""Fly's clients on the wire, without a booted guest: the bodies fly-go's flaps sends (as Go
marshals its types: empty strings, ``false`` and ``{}`` for what is unset, keys hangar does
not know), and the JSON types fly-go decodes (``version`` a string, ``request`` only on
exits, ``network`` on apps). What needs a running guest is in tests/agent/test_suspend.py."""

from __future__ import annotations

import time
from typing import Any

import httpx

from hangar.model.config import MachineConfig
from hangar.model.machine import Machine, MachineState, new_machine_id, new_ulid
from tests.api.helpers import assert_fly_error, unique, wait_runs_finished


def flaps_launch(image: str, **extra: Any) -> dict[str, Any]:
    """``fly.LaunchMachineInput`` as encoding/json writes it (no omitempty on ``init`` and
    ``skip_secrets``)."""
    return {
        "config": {
            "init": {},
            "image": image,
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "restart": {"policy": "no"},
        },
        "skip_secrets": False,
        **extra,
    }


def created(api: httpx.Client, app_name: str, image: str, **extra: Any) -> dict[str, Any]:
    response = api.post(
        f"/v1/apps/{app_name}/machines", json=flaps_launch(image, skip_launch=True, **extra)
    )
    assert response.status_code == 200, response.text
    machine: dict[str, Any] = response.json()
    return machine


def test_flaps_creates_an_app_and_reads_it_back(api: httpx.Client) -> None:
    name = unique("flaps")
    body = {"name": name, "org_slug": "personal", "network": "", "app_role_id": ""}
    response = api.post("/v1/apps?wait=true", json=body)
    assert response.status_code == 201, response.text
    app = response.json()
    assert app["name"] == app["id"] == name
    assert app["network"] == "default"
    assert isinstance(app["internal_numeric_id"], int) and app["internal_numeric_id"] > 0
    assert app["machine_count"] == 0 and app["volume_count"] == 0
    assert app["organization"]["slug"] == "personal"
    listed = api.get("/v1/apps", params={"org_slug": "personal"}).json()
    [mine] = [item for item in listed["apps"] if item["name"] == name]
    assert mine["network"] == "default"
    assert mine["internal_numeric_id"] == app["internal_numeric_id"]


def test_flaps_machine_bodies_are_accepted_and_machines_decode(
    api: httpx.Client, app_name: str, test_image: str
) -> None:
    response = api.post(
        f"/v1/apps/{app_name}/machines",
        json=flaps_launch(test_image, skip_launch=True, lease_ttl=60, region="", a_new_field=1),
    )
    assert response.status_code == 200, response.text
    machine = response.json()
    assert isinstance(machine["version"], str)
    assert isinstance(machine["nonce"], str) and machine["nonce"]
    assert machine["cordoned"] is False
    assert machine["created_at"].endswith("Z") and "T" in machine["created_at"]
    assert all("request" not in event for event in machine["events"])
    base = f"/v1/apps/{app_name}/machines/{machine['id']}"
    got = api.get(base).json()
    assert "nonce" not in got, "the nonce is only returned by the create that made the lease"
    nonce = {"fly-machine-lease-nonce": machine["nonce"]}
    # fly.StopMachineInput carries its id and a Go duration; the machine is not running.
    assert_fly_error(
        api.post(f"{base}/stop", json={"id": machine["id"], "timeout": "1m0s"}, headers=nonce),
        412,
        "created",
    )
    assert_fly_error(api.post(f"{base}/stop", json={"timeout": "forever"}, headers=nonce), 422)
    # flaps' Kill sends the signal as a number.
    assert_fly_error(api.post(f"{base}/signal", json={"signal": 9}, headers=nonce), 412)
    assert api.delete(f"{base}?kill=false", headers=nonce).status_code == 200


def test_nulls_and_zero_values_are_go_zero_values(
    api: httpx.Client, app_name: str, test_image: str
) -> None:
    body = flaps_launch(test_image, skip_launch=True)
    body["config"].update(
        env=None, metadata=None, files=None, services=None, checks=None, mounts=None
    )
    body["config"]["dns"] = {"skip_registration": False}
    body["config"]["init"] = {"tty": False, "cmd": None}
    response = api.post(f"/v1/apps/{app_name}/machines", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["config"]["env"] == {}
    refused = flaps_launch(test_image, skip_launch=True, lsvd=True)
    assert_fly_error(api.post(f"/v1/apps/{app_name}/machines", json=refused), 422, "lsvd")


def test_curl_dash_d_is_read_as_json(api: httpx.Client) -> None:
    """``curl -d`` sends application/x-www-form-urlencoded; Fly parses the JSON anyway."""
    name = unique("curl")
    response = api.post(
        "/v1/apps",
        content=f'{{"app_name": "{name}", "org_slug": "personal"}}'.encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 201, response.text
    bare = api.post("/v1/apps", content=f'{{"name": "{unique("bare")}"}}'.encode())
    assert bare.status_code == 201, bare.text


def test_lease_ttl_from_the_query_as_flaps_asks(
    api: httpx.Client, app_name: str, test_image: str
) -> None:
    base = f"/v1/apps/{app_name}/machines/{created(api, app_name, test_image)['id']}"
    before = time.time()
    lease = api.post(f"{base}/lease?ttl=120")
    assert lease.status_code == 200, lease.text
    data = lease.json()["data"]
    assert 115 <= data["expires_at"] - before <= 125
    assert isinstance(data["version"], str) and data["nonce"]
    headers = {"fly-machine-lease-nonce": data["nonce"]}
    refreshed = api.post(f"{base}/lease", params={"ttl": 600}, headers=headers).json()["data"]
    assert refreshed["nonce"] == data["nonce"]
    assert refreshed["expires_at"] - before >= 595


def test_wait_for_any_of_several_states(api: httpx.Client, app_name: str, test_image: str) -> None:
    machine = created(api, app_name, test_image)
    base = f"/v1/apps/{app_name}/machines/{machine['id']}"
    wait_runs_finished(api, app_name, machine["id"])
    assert api.delete(base).status_code == 200
    waited = api.get(f"{base}/wait?state=started&state=destroyed&timeout=30")
    assert waited.status_code == 200, waited.text
    body = waited.json()
    assert body["ok"] is True and body["state"] == "destroyed"
    assert isinstance(body["version"], str)
    events = api.get(f"{base}/events").json()
    assert body["event_id"] == next(e["id"] for e in events if e["status"] == "destroyed")
    # Nothing reached a state after the latest event: from_event_id makes wait wait.
    latest = events[0]["id"]
    assert_fly_error(
        api.get(
            f"{base}/wait", params={"state": "destroyed", "timeout": 1, "from_event_id": latest}
        ),
        408,
    )
    assert_fly_error(api.get(f"{base}/wait", params={"state": "exploded"}), 400, "state")
    assert (
        api.get(f"{base}/wait", params={"state": "destroyed", "timeout": "5s"}).status_code == 200
    )


def test_updates_make_versions_and_metadata_moves_in_bulk(
    api: httpx.Client, app_name: str, test_image: str
) -> None:
    machine = created(api, app_name, test_image)
    machine_id = machine["id"]
    base = f"/v1/apps/{app_name}/machines/{machine_id}"
    wait_runs_finished(api, app_name, machine_id)
    update = flaps_launch(test_image, skip_launch=True, current_version=machine["version"])
    update["config"]["env"] = {"MODE": "two"}
    response = api.post(base, json=update)
    assert response.status_code == 200, response.text
    wait_runs_finished(api, app_name, machine_id)
    versions = api.get(f"{base}/versions").json()
    assert [v["version"] for v in versions] == ["2", "1"]
    assert versions[0]["user_config"]["env"] == {"MODE": "two"}
    assert api.get(base).json()["version"] == "2"

    assert api.post(f"{base}/metadata/tier", json={"value": "gold"}).status_code == 204
    assert api.get(f"{base}/metadata/tier").json() == {"value": "gold"}
    assert_fly_error(api.get(f"{base}/metadata/absent"), 404, "absent")
    patched = api.patch(
        f"{base}/metadata", json={"metadata": {"zone": "a", "tier": "", "nothing": None}}
    )
    assert patched.status_code == 200, patched.text
    assert api.get(f"{base}/metadata").json() == {"zone": "a"}
    assert_fly_error(api.patch(f"{base}/metadata", json={"metadata": {"bad key": "x"}}), 422)


def test_cordon_is_kept_and_shown(api: httpx.Client, app_name: str, test_image: str) -> None:
    base = f"/v1/apps/{app_name}/machines/{created(api, app_name, test_image)['id']}"
    assert api.post(f"{base}/cordon").status_code == 200
    assert api.get(base).json()["cordoned"] is True
    assert api.post(f"{base}/uncordon").status_code == 200
    assert api.get(base).json()["cordoned"] is False
    events = api.get(f"{base}/events").json()
    assert {("cordon", "user"), ("uncordon", "user")} <= {(e["type"], e["source"]) for e in events}
    registered = created(api, app_name, test_image, skip_service_registration=True)
    assert registered["cordoned"] is True


def test_guest_verbs_need_a_started_machine(
    api: httpx.Client, app_name: str, test_image: str
) -> None:
    base = f"/v1/apps/{app_name}/machines/{created(api, app_name, test_image)['id']}"
    assert_fly_error(api.post(f"{base}/suspend"), 412, "created")
    assert_fly_error(api.post(f"{base}/exec", json={"cmd": "uname -a"}), 412, "created")
    assert_fly_error(api.get(f"{base}/ps"), 412, "created")
    assert_fly_error(
        api.post(f"{base}/exec", json={"cmd": "ls", "container": "x"}), 422, "container"
    )
    assert_fly_error(api.get(f"{base}/ps", params={"sort_by": "colour"}), 400, "sort_by")


def test_app_secrets_set_list_unset(api: httpx.Client, app_name: str, test_image: str) -> None:
    base = f"/v1/apps/{app_name}/secrets"
    assert api.get(base).json() == {"secrets": []}
    first = api.post(f"{base}/API_KEY", json={"value": "hunter2-first"})
    assert first.status_code == 200, first.text
    assert first.json()["name"] == "API_KEY" and first.json()["version"] == 1
    assert "value" not in first.json()
    digest = first.json()["digest"]
    second = api.post(f"{base}/API_KEY", json={"value": "hunter2-second"}).json()
    assert second["digest"] != digest and second["version"] == 2
    bulk = api.post(base, json={"values": {"DB_URL": "postgres://x", "API_KEY": None}})
    assert bulk.status_code == 200, bulk.text
    assert [s["name"] for s in bulk.json()["secrets"]] == ["DB_URL"]
    assert bulk.json()["version"] == 3
    listed = api.get(base).json()["secrets"]
    assert [s["name"] for s in listed] == ["DB_URL"] and "value" not in listed[0]
    assert api.get(f"{base}/DB_URL").json()["name"] == "DB_URL"
    assert_fly_error(api.get(base, params={"show_secrets": "true"}), 422, "show_secrets")
    assert_fly_error(api.get(base, params={"version": 9}), 412, "version")
    assert api.delete(f"{base}/DB_URL").json() == {"version": 4}
    assert_fly_error(api.delete(f"{base}/DB_URL"), 404, "DB_URL")
    assert_fly_error(api.post(f"{base}/1BAD", json={"value": "x"}), 422, "name")
    # A machine that names a secret it cannot have, or a version not reached, is refused.
    file_body = flaps_launch(test_image, skip_launch=True)
    file_body["config"]["files"] = [{"guest_path": "/etc/key", "secret_name": "MISSING"}]
    missing = api.post(f"/v1/apps/{app_name}/machines", json=file_body)
    assert_fly_error(missing, 422, "MISSING")
    ahead = flaps_launch(test_image, skip_launch=True, min_secrets_version=99)
    assert_fly_error(
        api.post(f"/v1/apps/{app_name}/machines", json=ahead), 412, "min_secrets_version"
    )


def test_secret_values_are_sealed_at_rest_and_never_echoed(
    api: httpx.Client, app_name: str, api_server: Any
) -> None:
    value = "s3cr3t-" + unique("canary")
    response = api.post(f"/v1/apps/{app_name}/secrets/CANARY", json={"value": value})
    assert response.status_code == 200, response.text
    assert value not in response.text
    home = api_server.home
    key_file = home / "secrets.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    for path in home.glob("hangar.db*"):
        assert value.encode() not in path.read_bytes(), f"{path.name} holds the value"
    audit = api.get("/v1/audit").text
    assert value not in audit and "CANARY" in audit
    bad = api.post(f"/v1/apps/{app_name}/secrets/CANARY", json={"value": value + "\u0000"})
    assert_fly_error(bad, 422, "CANARY")
    assert value not in bad.text


def test_a_gpu_machine_cannot_be_suspended(
    api: httpx.Client, app_name: str, api_server: Any
) -> None:
    """A VFIO device cannot be migrated: 422 naming the field, before anything is asked of
    the host (the machine is recorded started as a GPU host would have it)."""
    now = time.time()
    config = MachineConfig.model_validate(
        {
            "image": "x",
            "guest": {"cpu_kind": "performance", "gpu_kind": "h100-sxm", "gpus": 1},
        }
    )
    machine = Machine(
        id=new_machine_id(),
        name=unique("gpu"),
        app=app_name,
        state=MachineState.STARTED,
        region="local",
        instance_id=new_ulid(now),
        version=1,
        config=config,
        created_at=now,
        updated_at=now,
    )
    api_server.embedded.stores.machines.insert_machine(machine)
    response = api.post(f"/v1/apps/{app_name}/machines/{machine.id}/suspend")
    assert_fly_error(response, 422, "config.guest.gpus")
    assert api_server.embedded.agent.has_unfinished_run(machine.id) is False


def test_a_machine_with_a_gpu_slice_cannot_be_suspended(
    api: httpx.Client, app_name: str, api_server: Any
) -> None:
    """A GPU slice's state cannot be saved (a CPU-only sandbox can be suspended): 422 naming
    the guest, as for a GPU machine."""
    now = time.time()
    guest = {"gpu_kind": "a100-sxm4-80gb", "gpu_share": 0.25}
    config = MachineConfig.model_validate({"image": "x", "guest": guest})
    machine = Machine(
        id=new_machine_id(),
        name=unique("sandbox"),
        app=app_name,
        state=MachineState.STARTED,
        region="local",
        instance_id=new_ulid(now),
        version=1,
        config=config,
        created_at=now,
        updated_at=now,
    )
    api_server.embedded.stores.machines.insert_machine(machine)
    assert machine.tier == "sandbox"
    response = api.post(f"/v1/apps/{app_name}/machines/{machine.id}/suspend")
    assert_fly_error(response, 422, "config.guest", "GPU slice")
    assert api_server.embedded.agent.has_unfinished_run(machine.id) is False
