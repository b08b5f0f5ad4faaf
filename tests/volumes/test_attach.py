"""Attach rules: one machine at a time, never while it runs (a 409 that says why); mounts."""

from __future__ import annotations

import pytest

from hangar.errors import Conflict, Unprocessable
from hangar.volumes.attach import check_attach, check_detach, guest_volumes
from hangar.volumes.model import MAX_VOLUMES_PER_MACHINE, VolumeSpec, new_volume_id

VOLUME = "vol_aaaaaaaaaaaaaaaa"


def test_attaching_to_a_running_machine_is_a_clear_409() -> None:
    with pytest.raises(Conflict, match="while it runs; stop the machine first") as refused:
        check_attach(VOLUME, "m1", attached_to=None, machine_running=True)
    assert refused.value.http_status == 409
    assert refused.value.fields == {"volume_id": VOLUME, "machine_id": "m1"}


def test_a_volume_attached_elsewhere_is_refused_and_reattaching_is_fine() -> None:
    with pytest.raises(Conflict, match="attached to machine m2"):
        check_attach(VOLUME, "m1", attached_to="m2", machine_running=False)
    check_attach(VOLUME, "m1", attached_to="m1", machine_running=False)
    check_attach(VOLUME, "m1", attached_to=None, machine_running=False)


def test_detach_only_from_its_stopped_machine() -> None:
    with pytest.raises(Conflict):
        check_detach(VOLUME, "m1", attached_to="m2", machine_running=False)
    with pytest.raises(Conflict, match="while it runs"):
        check_detach(VOLUME, "m1", attached_to="m1", machine_running=True)
    check_detach(VOLUME, "m1", attached_to="m1", machine_running=False)


def test_mounts_become_guest_volumes_in_order_and_are_bounded() -> None:
    specs = [VolumeSpec(id=new_volume_id(), size_gb=1) for _ in range(2)]
    mounts = guest_volumes([(specs[0], "/data"), (specs[1], "/srv/db")])
    assert [(m.serial, m.path) for m in mounts] == [
        (specs[0].id, "/data"),
        (specs[1].id, "/srv/db"),
    ]
    with pytest.raises(Unprocessable) as bad_path:
        guest_volumes([(specs[0], "relative")])
    assert bad_path.value.fields["field"] == "config.mounts.path"
    many = [(VolumeSpec(id=new_volume_id(), size_gb=1), f"/v{i}") for i in range(9)]
    assert len(many) > MAX_VOLUMES_PER_MACHINE
    with pytest.raises(Unprocessable):
        guest_volumes(many)
