"""Volumes: slices of a host's disk that outlive machines, attached to one machine at a time.

A volume is a qcow2 image under ``$HANGAR_HOME/volumes`` (sparse; snapshots inside it,
copy-on-write), optionally LUKS-encrypted by QEMU under a random per-volume key that a host key
wraps. :class:`VolumeHost` checks requests and turns create / extend / snapshot / delete into
plans of idempotent steps; :meth:`VolumeHost.attachment` gives the disk a machine boots with
(``VmSpec.volumes``), and the guest's init formats, grows and mounts it
(``hangar/images/guest/volumes``).
"""

from hangar.volumes.attach import check_attach, check_detach, guest_volume, guest_volumes
from hangar.volumes.host import VolumeHost, fork_snapshot_name
from hangar.volumes.keys import KeyStore
from hangar.volumes.layout import VolumeLayout
from hangar.volumes.model import (
    ForkOf,
    FromSnapshot,
    ImageInfo,
    SnapshotInfo,
    VolumeSource,
    VolumeSpec,
    new_snapshot_id,
    new_volume_id,
)
from hangar.volumes.online import describe_io_errors, resume_vm, volume_io_errors
from hangar.volumes.plan import VolumePlan, VolumeStep
from hangar.volumes.reconcile import ReconcileReport
from hangar.volumes.schedule import SnapshotDecision, decide_snapshots, maintain_snapshots
from hangar.volumes.settings import VolumeSettings

__all__ = [
    "ForkOf",
    "FromSnapshot",
    "ImageInfo",
    "KeyStore",
    "ReconcileReport",
    "SnapshotDecision",
    "SnapshotInfo",
    "VolumeHost",
    "VolumeLayout",
    "VolumePlan",
    "VolumeSettings",
    "VolumeSource",
    "VolumeSpec",
    "VolumeStep",
    "check_attach",
    "check_detach",
    "decide_snapshots",
    "describe_io_errors",
    "fork_snapshot_name",
    "guest_volume",
    "guest_volumes",
    "maintain_snapshots",
    "new_snapshot_id",
    "new_volume_id",
    "resume_vm",
    "volume_io_errors",
]
