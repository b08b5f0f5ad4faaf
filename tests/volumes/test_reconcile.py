"""The reconciler removes images and keys no record names only after the grace period (an
injected clock, no waiting), and never a file of an owned volume."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from hangar.clock import ManualClock
from hangar.volumes.model import VolumeSpec, new_volume_id
from tests.volumes.helpers import new_host

GRACE_S = 600.0


def test_orphans_go_after_the_grace_period_owned_files_never(tmp_path: Path) -> None:
    clock = ManualClock(start=time.time())
    host = new_host(tmp_path / "volumes", clock=clock, grace_s=GRACE_S)
    owned = VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=True)
    orphan = VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=True)
    for spec in (owned, orphan):
        asyncio.run(host.create_plan(spec).execute())
    owned_partial = host.layout.partial_image(new_volume_id())
    owned_partial.write_bytes(b"half")
    stray_secret = host.layout.run_dir / "m1.vol_x.key"
    stray_secret.write_bytes(b"left by a crash")
    not_ours = host.layout.images_dir / "README"
    not_ours.write_text("an operator's note")
    owned_ids = {owned.id, owned_partial.name.split(".")[0]}

    early = host.reconcile(owned_ids)
    assert early.removed == []
    assert set(early.waiting) == {host.layout.image(orphan.id), host.layout.key(orphan.id)}

    clock.advance(time.time() - clock.now() + GRACE_S + 1)  # the files were written just now
    late = host.reconcile(owned_ids)

    assert set(late.removed) == {
        host.layout.image(orphan.id),
        host.layout.key(orphan.id),
        stray_secret,
    }
    assert host.layout.image(owned.id).exists() and host.layout.key(owned.id).exists()
    assert owned_partial.exists()
    assert not_ours.exists()
    clock.advance(365 * 86400.0)
    assert host.reconcile(owned_ids).removed == []


def test_a_young_orphan_is_measured_from_its_last_change(tmp_path: Path) -> None:
    clock = ManualClock(start=time.time())
    host = new_host(tmp_path / "volumes", clock=clock, grace_s=GRACE_S)
    host.layout.ensure_dirs()
    orphan = host.layout.image(new_volume_id())
    orphan.write_bytes(b"x")
    clock.advance(GRACE_S + 1)
    os.utime(orphan, (clock.now(), clock.now()))  # written to just now: a create in flight
    assert host.reconcile(set()).waiting == [orphan]
