"""VolumeHost: the volumes of one host, and every operation on them.

Checks (``check_*``) raise a clear 4xx before anything is written. Operations are plans of
idempotent steps (:mod:`hangar.volumes.plan`); a volume attached to a running machine is
worked on through that machine's QEMU monitor (pass its ``qmp_socket``), any other through
``qemu-img``.

- create: ``create_key`` (encrypted volumes), ``create_image`` into ``*.partial``, renamed
  into place when whole; from a snapshot: ``copy_image`` from that snapshot instead; a fork:
  ``freeze_source`` (an internal snapshot of the source at this instant), ``copy_image``,
  ``release_source``. Copies are independent images, re-encrypted under the new volume's
  own key, so any source can be deleted later without harm to them.
- extend: ``resize_image`` (``qemu-img resize``, or QMP ``block_resize`` while running);
  the guest grows its filesystem at the next mount, or at once while running; a sandbox
  machine's volume, mounted by the host (:mod:`hangar.volumes.host_mount`), is grown by
  the host (``grow_filesystem``).
- snapshot: ``take_snapshot`` / ``delete_snapshot`` (qcow2 internal snapshots).
- delete: ``check_not_in_use``, ``delete_key`` (the data is unreadable from here on),
  ``delete_image``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from hangar.clock import Clock, SystemClock
from hangar.errors import Conflict, NotFound, Unprocessable
from hangar.vmm.driver import VolumeDiskSpec
from hangar.volumes.host_mount import HostMounts, state_root_for
from hangar.volumes.keys import KeyStore
from hangar.volumes.layout import VolumeLayout
from hangar.volumes.model import (
    GIB,
    MAX_SNAPSHOTS_PER_VOLUME,
    SNAPSHOT_ID_PATTERN,
    ForkOf,
    FromSnapshot,
    ImageInfo,
    SnapshotInfo,
    VolumeSource,
    VolumeSpec,
    check_size_gb,
    check_snapshot_id,
    check_volume_id,
    size_bytes,
)
from hangar.volumes.online import (
    delete_snapshot_online,
    resize_online,
    snapshot_online,
)
from hangar.volumes.plan import VolumePlan, VolumeStep
from hangar.volumes.qemu_img import ImageAccess, QemuImg
from hangar.volumes.reconcile import ReconcileReport, reconcile_volume_files
from hangar.volumes.settings import VolumeSettings

FORK_SNAPSHOT_PREFIX = "fork-"


def fork_snapshot_name(new_volume_id: str) -> str:
    """The internal snapshot a fork copies from, named after the new volume."""
    return f"{FORK_SNAPSHOT_PREFIX}{new_volume_id}"


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class VolumeHost:
    def __init__(
        self,
        settings: VolumeSettings,
        *,
        clock: Clock | None = None,
        qemu_img: QemuImg | None = None,
        free_bytes: Callable[[Path], int] = _free_bytes,
        mounts: HostMounts | None = None,
    ) -> None:
        self.settings = settings
        self.layout = VolumeLayout(settings.root)
        self.keys = KeyStore(self.layout, settings.host_key_file)
        self.qemu_img = qemu_img or QemuImg()
        self.mounts = mounts or HostMounts(state_root_for(settings.root))
        """The volumes mounted on this host for sandbox-tier machines."""
        self.clock: Clock = clock or SystemClock()
        self._free_bytes = free_bytes

    # ---- reads -------------------------------------------------------------------------

    def exists(self, volume_id: str) -> bool:
        return self.layout.image(volume_id).exists()

    def info(self, volume_id: str) -> ImageInfo:
        image = self.layout.image(volume_id)
        if not image.exists():
            raise NotFound(f"volume {volume_id} has no image on this host", volume_id=volume_id)
        return self.qemu_img.info(image)

    def snapshots(self, volume_id: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first (a fork's short-lived snapshot left out)."""
        found = [s for s in self.info(volume_id).snapshots if SNAPSHOT_ID_PATTERN.fullmatch(s.id)]
        return sorted(found, key=lambda snapshot: snapshot.created_at)

    def check_image(self, volume_id: str) -> dict[str, Any]:
        """``qemu-img check`` of the volume's image: raises :class:`VolumeError` if corrupt."""
        with self._access(volume_id) as access:
            return self.qemu_img.check(access)

    def free_bytes(self) -> int:
        """Free space on the disk volumes live on (the reserve included)."""
        self.layout.ensure_dirs()
        return self._free_bytes(self.layout.root)

    def available_bytes(self) -> int:
        """Free space volumes may still take: the disk's free space less the reserve."""
        return max(0, self.free_bytes() - self.settings.reserve_bytes)

    # ---- checks: a 4xx before anything is written ---------------------------------------

    def _check_space(self, needed: int, field: str) -> None:
        available = self.available_bytes()
        if needed > available:
            raise Unprocessable(
                f"{field}: {needed / GIB:.0f} GB is more than this host can give volumes "
                f"({available / GIB:.1f} GB free after the operator's reserve)",
                field=field,
                needed_bytes=needed,
                available_bytes=available,
            )

    def check_create(self, spec: VolumeSpec, source: VolumeSource | None = None) -> None:
        check_size_gb(spec.size_gb)
        if self.exists(spec.id):
            raise Conflict(f"volume {spec.id} already exists on this host", volume_id=spec.id)
        if source is not None:
            info = self.info(source.volume_id)
            if isinstance(source, FromSnapshot) and info.snapshot(source.snapshot_id) is None:
                raise NotFound(
                    f"volume {source.volume_id} has no snapshot {source.snapshot_id}",
                    field="snapshot_id",
                    snapshot_id=source.snapshot_id,
                )
            if spec.size_bytes < info.virtual_size:
                raise Unprocessable(
                    f"size_gb must be at least the source's {info.virtual_size // GIB} GB",
                    field="size_gb",
                )
        self._check_space(spec.size_bytes, "size_gb")

    def check_extend(self, volume_id: str, new_size_gb: int) -> None:
        check_size_gb(new_size_gb)
        current = self.info(volume_id).virtual_size
        if size_bytes(new_size_gb) <= current:
            raise Unprocessable(
                f"size_gb must be more than the volume's {current // GIB} GB "
                f"(volumes grow, never shrink), not {new_size_gb}",
                field="size_gb",
                current_size_gb=current // GIB,
            )
        self._check_space(size_bytes(new_size_gb) - current, "size_gb")

    def check_snapshot(self, volume_id: str) -> None:
        if len(self.snapshots(volume_id)) >= MAX_SNAPSHOTS_PER_VOLUME:
            raise Unprocessable(
                f"volume {volume_id} has {MAX_SNAPSHOTS_PER_VOLUME} snapshots, the most it may "
                "keep; delete one first",
                field="snapshots",
                volume_id=volume_id,
            )

    # ---- images and keys ----------------------------------------------------------------

    def _encrypted(self, volume_id: str) -> bool:
        return self.qemu_img.info(self.layout.image(volume_id)).encrypted

    @contextlib.contextmanager
    def _key_file(self, volume_id: str, encrypted: bool) -> Iterator[Path | None]:
        if not encrypted:
            yield None
            return
        with self.keys.secret_file(volume_id) as path:
            yield path

    @contextlib.contextmanager
    def _access(self, volume_id: str) -> Iterator[ImageAccess]:
        with self._key_file(volume_id, self._encrypted(volume_id)) as secret:
            yield ImageAccess(self.layout.image(volume_id), secret)

    def _publish(self, volume_id: str) -> None:
        """Rename the whole ``.partial`` image into place, durably."""
        partial = self.layout.partial_image(volume_id)
        with open(partial, "rb") as image:
            os.fsync(image.fileno())
        os.replace(partial, self.layout.image(volume_id))
        descriptor = os.open(self.layout.images_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    async def _write_partial(self, volume_id: str, write: Callable[[Path], None]) -> None:
        """``write(partial)`` then publish; a failure leaves no partial behind."""
        self.layout.ensure_dirs()
        partial = self.layout.partial_image(volume_id)
        partial.unlink(missing_ok=True)
        try:
            await asyncio.to_thread(write, partial)
            await asyncio.to_thread(self._publish, volume_id)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    # ---- create ------------------------------------------------------------------------

    def create_plan(
        self,
        spec: VolumeSpec,
        source: VolumeSource | None = None,
        *,
        source_qmp: Path | None = None,
    ) -> VolumePlan:
        """Create ``spec``'s image, blank or from ``source``. ``source_qmp``: the monitor of
        the running machine a forked source is attached to, if any."""
        image = self.layout.image(spec.id)

        async def image_missing() -> bool:
            return not image.exists()

        steps: list[VolumeStep] = []
        if spec.encrypted:

            async def key_missing() -> bool:
                return not self.keys.exists(spec.id)

            async def create_key() -> None:
                await asyncio.to_thread(self.keys.create, spec.id)

            steps.append(VolumeStep("create_key", key_missing, create_key))

        if source is None:

            async def create_image() -> None:
                def write(partial: Path) -> None:
                    with self._key_file(spec.id, spec.encrypted) as secret:
                        self.qemu_img.create(partial, spec.size_bytes, secret)

                await self._write_partial(spec.id, write)

            steps.append(VolumeStep("create_image", image_missing, create_image))
            return VolumePlan("create", spec.id, tuple(steps), self._create_rollback(spec.id))

        snapshot = (
            source.snapshot_id if isinstance(source, FromSnapshot) else fork_snapshot_name(spec.id)
        )
        if isinstance(source, ForkOf):
            steps.append(self._freeze_source(spec.id, source.volume_id, source_qmp, image))

        async def copy_image() -> None:
            def write(partial: Path) -> None:
                with (
                    self._access(source.volume_id) as source_access,
                    self._key_file(spec.id, spec.encrypted) as secret,
                ):
                    self.qemu_img.convert(source_access, partial, secret, snapshot=snapshot)
                    if self.qemu_img.info(partial).virtual_size < spec.size_bytes:
                        self.qemu_img.resize(ImageAccess(partial, secret), spec.size_bytes)

            await self._write_partial(spec.id, write)

        steps.append(VolumeStep("copy_image", image_missing, copy_image))
        rollback = self._create_rollback(spec.id)
        if isinstance(source, ForkOf):
            release = self._release_source(spec.id, source.volume_id, source_qmp)
            steps.append(release)
            rollback = (
                *rollback,
                self._release_source(spec.id, source.volume_id, source_qmp, "undo_"),
            )
        return VolumePlan("create", spec.id, tuple(steps), rollback)

    def _has_snapshot(self, volume_id: str, name: str) -> bool:
        return self.exists(volume_id) and self.info(volume_id).snapshot(name) is not None

    def _snapshot_step(
        self,
        step: str,
        volume_id: str,
        name: str,
        qmp_socket: Path | None,
        *,
        create: bool,
        unless_exists: Path | None = None,
    ) -> VolumeStep:
        """A step that makes (``create``) or removes snapshot ``name`` of ``volume_id``
        unless it is so already (or, when given, ``unless_exists`` is there: the copy a
        fork's snapshot is for has been made)."""

        async def should_run() -> bool:
            if unless_exists is not None and unless_exists.exists():
                return False
            return create != await asyncio.to_thread(self._has_snapshot, volume_id, name)

        async def run() -> None:
            await self._snapshot(volume_id, name, qmp_socket, create=create)

        return VolumeStep(step, should_run, run)

    def _freeze_source(
        self, new_id: str, source_id: str, qmp_socket: Path | None, image: Path
    ) -> VolumeStep:
        name = fork_snapshot_name(new_id)
        return self._snapshot_step(
            "freeze_source", source_id, name, qmp_socket, create=True, unless_exists=image
        )

    def _release_source(
        self, new_id: str, source_id: str, qmp_socket: Path | None, prefix: str = ""
    ) -> VolumeStep:
        name = fork_snapshot_name(new_id)
        return self._snapshot_step(
            f"{prefix}release_source", source_id, name, qmp_socket, create=False
        )

    def _create_rollback(self, volume_id: str) -> tuple[VolumeStep, ...]:
        """A create that failed leaves neither image nor key (the record may be dropped)."""
        return tuple(
            VolumeStep(f"undo_{step.name}", step.should_run, step.run)
            for step in self._removal_steps(volume_id)
        )

    # ---- extend ------------------------------------------------------------------------

    def extend_plan(
        self, volume_id: str, new_size_gb: int, *, qmp_socket: Path | None = None
    ) -> VolumePlan:
        target = size_bytes(new_size_gb)

        async def smaller() -> bool:
            return (await asyncio.to_thread(self.info, volume_id)).virtual_size < target

        async def resize() -> None:
            if qmp_socket is not None:
                await resize_online(qmp_socket, volume_id, target, clock=self.clock)
                return

            def offline() -> None:
                with self._access(volume_id) as access:
                    self.qemu_img.resize(access, target)

            await asyncio.to_thread(offline)

        async def mounted_here() -> bool:
            return await asyncio.to_thread(self.mounts.mounted, volume_id)

        async def grow() -> None:
            await asyncio.to_thread(self.mounts.grow, volume_id, target)

        return VolumePlan(
            "extend",
            volume_id,
            (
                VolumeStep("resize_image", smaller, resize),
                # A sandbox machine's volume is mounted by this host, which grows it (a VM's
                # guest grows its own).
                VolumeStep("grow_filesystem", mounted_here, grow),
            ),
        )

    # ---- snapshots ---------------------------------------------------------------------

    async def _snapshot(
        self, volume_id: str, name: str, qmp_socket: Path | None, *, create: bool
    ) -> None:
        """Make or remove an internal snapshot: through QEMU's monitor while a machine has
        the volume open, else with ``qemu-img``."""
        if qmp_socket is not None:
            if create:
                await asyncio.to_thread(self.mounts.sync, volume_id)
            online = snapshot_online if create else delete_snapshot_online
            await online(qmp_socket, volume_id, name, clock=self.clock)
            return

        def offline() -> None:
            with self._access(volume_id) as access:
                if create:
                    self.qemu_img.snapshot_create(access, name)
                else:
                    self.qemu_img.snapshot_delete(access, name)

        await asyncio.to_thread(offline)

    def snapshot_plan(
        self, volume_id: str, snapshot_id: str, *, qmp_socket: Path | None = None
    ) -> VolumePlan:
        check_snapshot_id(snapshot_id)
        take = self._snapshot_step("take_snapshot", volume_id, snapshot_id, qmp_socket, create=True)
        undo = self._snapshot_step(
            "undo_take_snapshot", volume_id, snapshot_id, qmp_socket, create=False
        )
        return VolumePlan("snapshot", volume_id, (take,), (undo,))

    def delete_snapshot_plan(
        self, volume_id: str, snapshot_id: str, *, qmp_socket: Path | None = None
    ) -> VolumePlan:
        check_snapshot_id(snapshot_id)
        step = self._snapshot_step(
            "delete_snapshot", volume_id, snapshot_id, qmp_socket, create=False
        )
        return VolumePlan("delete_snapshot", volume_id, (step,))

    # ---- delete ------------------------------------------------------------------------

    def _removal_steps(self, volume_id: str) -> tuple[VolumeStep, ...]:
        image = self.layout.image(volume_id)
        partial = self.layout.partial_image(volume_id)

        async def image_there() -> bool:
            return image.exists()

        async def refuse_if_in_use() -> None:
            if await asyncio.to_thread(self.qemu_img.in_use, image):
                raise Conflict(
                    f"volume {volume_id} is in use by a running machine; stop it first",
                    volume_id=volume_id,
                )

        async def key_there() -> bool:
            return self.keys.exists(volume_id)

        async def delete_key() -> None:
            self.keys.delete(volume_id)

        async def files_there() -> bool:
            return image.exists() or partial.exists()

        async def delete_image() -> None:
            partial.unlink(missing_ok=True)
            image.unlink(missing_ok=True)

        return (
            VolumeStep("check_not_in_use", image_there, refuse_if_in_use),
            VolumeStep("delete_key", key_there, delete_key),
            VolumeStep("delete_image", files_there, delete_image),
        )

    def delete_plan(self, volume_id: str) -> VolumePlan:
        """Delete the volume's key, then its image (its snapshots are inside it)."""
        check_volume_id(volume_id)
        return VolumePlan("delete", volume_id, self._removal_steps(volume_id))

    # ---- reconcile ---------------------------------------------------------------------

    def reconcile(self, owned: Collection[str]) -> ReconcileReport:
        """Remove images and keys no record names (``owned``: the ids of every volume record
        on this host, whatever its state) once they are older than the grace period."""
        return reconcile_volume_files(self.layout, owned, self.clock, self.settings.orphan_grace_s)

    # ---- attach ------------------------------------------------------------------------

    def attachment(
        self, volume_id: str, machine_id: str, *, read_only: bool = False
    ) -> VolumeDiskSpec:
        """The volume as a disk of ``machine_id``'s next launch. An encrypted volume's
        passphrase is written to a 0600 file in the private ``run`` folder, which the QEMU
        driver removes once QEMU has read it (the reconciler sweeps one a crash left)."""
        info = self.info(volume_id)
        key_file = None
        if info.encrypted:
            self.layout.ensure_dirs()
            key_file = self.keys.write_secret_file(
                volume_id, self.layout.run_dir / f"{machine_id}.{volume_id}.key"
            )
        return VolumeDiskSpec(
            name=volume_id,
            image=self.layout.image(volume_id),
            key_file=key_file,
            read_only=read_only,
        )
