"""Crash safety: every volume operation killed after each of its steps (and a copy killed in
the middle of writing) converges when run again, leaving no partial image, stray key or
short-lived snapshot behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hangar.volumes.host import VolumeHost, fork_snapshot_name
from hangar.volumes.model import GIB, VolumeSpec, new_snapshot_id, new_volume_id
from tests.volumes.crash_child import build_plan
from tests.volumes.helpers import MIB, holds_pattern, new_host, write_pattern

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 120


@dataclass
class Case:
    """A request on a prepared host, and what must hold once it has converged."""

    request: dict[str, Any]
    check: Any


def run_child(root: Path, crash_after: str, request: dict[str, Any]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.volumes.crash_child", str(root), crash_after]
    return subprocess.Popen(
        [*argv, json.dumps(request)],
        cwd=REPO_ROOT,
        start_new_session=True,
        stderr=subprocess.PIPE,
    )


def volume(encrypted: bool = False, size_gb: int = 1) -> VolumeSpec:
    return VolumeSpec(id=new_volume_id(), size_gb=size_gb, encrypted=encrypted)


def made(host: VolumeHost, spec: VolumeSpec) -> VolumeSpec:
    asyncio.run(host.create_plan(spec).execute())
    return spec


def no_leftovers(host: VolumeHost) -> None:
    assert not [p for p in host.layout.images_dir.iterdir() if p.name.endswith(".partial")]
    assert not [p for p in host.layout.keys_dir.iterdir() if p.name.endswith(".partial")]
    assert list(host.layout.run_dir.iterdir()) == []
    images = {p.name.removesuffix(".qcow2") for p in host.layout.images_dir.iterdir()}
    keys = {p.name.removesuffix(".key") for p in host.layout.keys_dir.iterdir()}
    assert keys <= images, "a key without its image"
    for volume_id in images:
        assert not [s for s in host.info(volume_id).snapshots if s.id.startswith("fork-")]


def prepare(host: VolumeHost, operation: str) -> Case:
    """A fresh host state for ``operation`` and the request to crash."""
    if operation == "create":
        spec = volume(encrypted=True)

        def created() -> None:
            assert host.info(spec.id).encrypted
            assert host.info(spec.id).virtual_size == GIB

        return Case({"operation": "create", "spec": spec.model_dump()}, created)
    if operation in ("restore", "fork"):
        source = made(host, volume())
        write_pattern(host, source.id, 0xD4, 0, MIB)
        request: dict[str, Any] = {"operation": "create", "source_id": source.id}
        if operation == "restore":
            request["snapshot_id"] = new_snapshot_id()
            asyncio.run(host.snapshot_plan(source.id, request["snapshot_id"]).execute())
            write_pattern(host, source.id, 0xE5, 0, MIB)
        target = volume(encrypted=operation == "fork", size_gb=2)
        request["spec"] = target.model_dump()

        def copied() -> None:
            assert holds_pattern(host, target.id, 0xD4, 0, MIB)
            assert host.info(target.id).virtual_size == 2 * GIB
            assert host.info(source.id).snapshot(fork_snapshot_name(target.id)) is None

        return Case(request, copied)
    existing = made(host, volume())
    snapshot_id = new_snapshot_id()
    if operation == "delete_snapshot":
        asyncio.run(host.snapshot_plan(existing.id, snapshot_id).execute())

    def converged() -> None:
        if operation == "extend":
            assert host.info(existing.id).virtual_size == 2 * GIB
        elif operation == "snapshot":
            assert [s.id for s in host.snapshots(existing.id)] == [snapshot_id]
        elif operation == "delete_snapshot":
            assert host.snapshots(existing.id) == []
        else:
            assert not host.exists(existing.id)

    request = {"operation": operation, "volume_id": existing.id}
    if operation == "extend":
        request["size_gb"] = 2
    if operation in ("snapshot", "delete_snapshot"):
        request["snapshot_id"] = snapshot_id
    return Case(request, converged)


STEPS = [
    ("create", "create_key"),
    ("create", "create_image"),
    ("restore", "copy_image"),
    ("fork", "create_key"),
    ("fork", "freeze_source"),
    ("fork", "copy_image"),
    ("fork", "release_source"),
    ("extend", "resize_image"),
    ("snapshot", "take_snapshot"),
    ("delete_snapshot", "delete_snapshot"),
    ("delete", "check_not_in_use"),
    ("delete", "delete_key"),
    ("delete", "delete_image"),
]


@pytest.mark.parametrize(("operation", "step"), STEPS)
def test_killed_after_each_step_the_operation_converges_when_run_again(
    tmp_path: Path, operation: str, step: str
) -> None:
    root = tmp_path / "volumes"
    host = new_host(root)
    case = prepare(host, operation)
    assert step in build_plan(host, case.request).step_names

    child = run_child(root, step, case.request)
    _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL, stderr.decode()

    asyncio.run(build_plan(host, case.request).execute())
    case.check()
    no_leftovers(host)
    asyncio.run(build_plan(host, case.request).execute())  # once more: nothing left to do
    case.check()


def test_a_copy_killed_while_writing_leaves_a_partial_that_the_rerun_replaces(
    tmp_path: Path,
) -> None:
    root = tmp_path / "volumes"
    host = new_host(root)
    source = made(host, volume())
    write_pattern(host, source.id, 0x3C, 0, 256 * MIB)
    target = volume()
    request = {"operation": "create", "source_id": source.id, "spec": target.model_dump()}
    partial = host.layout.partial_image(target.id)

    child = run_child(root, "never", request)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not partial.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(child.pid, signal.SIGKILL)  # the child and its qemu-img
    child.wait()
    if child.returncode == 0:
        pytest.skip("the copy finished before it could be killed")

    asyncio.run(build_plan(host, request).execute())
    assert holds_pattern(host, target.id, 0x3C, 0, 256 * MIB)
    no_leftovers(host)
