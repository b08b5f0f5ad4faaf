"""The GPU driver bundle: manifest checks, its cached ext4 disk, the NVIDIA device-node list,
and real guests that load a bundle's module and see its files read-only."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hangar.images.busybox import HOST_BUSYBOX
from hangar.images.driver_bundle import (
    DRIVER_BUNDLE_SETTING,
    GUEST_ENV_NAME,
    NVLINK_OFF_KERNEL_ARG,
    DriverBundleError,
    DriverBundleManifest,
    build_driver_bundle_disk,
    bundle_digest,
    check_bundle_for_kernel,
    configured_driver_bundle,
    ensure_driver_bundle_disk,
    load_bundle_manifest,
    module_firmware,
    prepare_driver_bundle,
)
from hangar.images.initramfs import (
    module_bytes,
    nvidia_nodes_script,
    resolve_modules,
    xid_events_script,
)
from hangar.images.kernel import GuestKernel
from hangar.images.rootfs import CachedImage, make_ext4
from hangar.images.run_config import GuestFile, GuestRunConfig
from tests.fixtures.driver_bundle import (
    DRIVER_VERSION,
    KERNEL_VERSION,
    LIBRARY,
    write_bundle,
)
from tests.images.ext4 import list_dir, read_file
from tests.images.guest_boot import boot
from tests.images.recording import RecordingRunner


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle", {"nvidia": b"module nvidia", "nvidia_uvm": b"uvm"})


def _stand_in_kernel(root: Path, version: str) -> GuestKernel:
    return GuestKernel(
        vmlinuz=root / "vmlinuz", modules_dir=root / "lib" / "modules" / version, version=version
    )


# --- the manifest


def test_loads_a_bundle_folder(bundle: Path) -> None:
    manifest = load_bundle_manifest(bundle)
    assert manifest == DriverBundleManifest(
        driver_version=DRIVER_VERSION,
        kernel_version=KERNEL_VERSION,
        modules=["nvidia", "nvidia_uvm"],
        libraries="lib",
        binaries="bin",
        firmware="firmware",
    )
    assert manifest.guest_env() == (
        f"DRIVER_VERSION={DRIVER_VERSION}\nDRIVER_MODULES='nvidia nvidia_uvm'\n"
        "DRIVER_LIBRARIES=lib\nDRIVER_BINARIES=bin\nDRIVER_FIRMWARE=firmware\n"
    )


def test_missing_bundle_path(tmp_path: Path) -> None:
    with pytest.raises(DriverBundleError) as raised:
        load_bundle_manifest(tmp_path / "nowhere")
    assert raised.value.fields == {"bundle": str(tmp_path / "nowhere"), "reason": "missing"}
    with pytest.raises(DriverBundleError, match="does not exist"):
        ensure_driver_bundle_disk(tmp_path / "nowhere", tmp_path / "cache")


def test_missing_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").unlink()
    with pytest.raises(DriverBundleError, match=r"has no manifest\.json") as raised:
        load_bundle_manifest(bundle)
    assert raised.value.fields["reason"] == "no_manifest"


@pytest.mark.parametrize(
    ("content", "field", "message"),
    [
        ('{"driver_version": "550", ', "", "Invalid JSON"),
        ('{"driver_version": "550.90.07", "modules": ["nvidia"]}', "kernel_version", "required"),
        (
            '{"driver_version": "550", "kernel_version": "6.1", "modules": []}',
            "modules",
            "at least 1",
        ),
        (
            '{"driver_version": "550", "kernel_version": "6.1", "modules": ["nvidia; reboot"]}',
            "modules",
            "not a kernel module name",
        ),
        (
            '{"driver_version": "550", "kernel_version": "6.1", "modules": ["nvidia"], '
            '"libraries": "../host/lib"}',
            "libraries",
            "without '.' or '..'",
        ),
        (
            '{"driver_version": "550", "kernel_version": "6.1", "modules": ["nvidia"], '
            '"module": "typo"}',
            "module",
            "Extra inputs",
        ),
    ],
)
def test_bad_manifest_names_the_field(bundle: Path, content: str, field: str, message: str) -> None:
    (bundle / "manifest.json").write_text(content)
    with pytest.raises(DriverBundleError, match=re.escape(message)) as raised:
        load_bundle_manifest(bundle)
    assert raised.value.fields["reason"] == "bad_manifest"
    assert raised.value.fields["field"] == field


def test_a_listed_module_missing(bundle: Path) -> None:
    (bundle / "modules" / "nvidia_uvm.ko").unlink()
    with pytest.raises(DriverBundleError, match=r"has no modules/nvidia_uvm\.ko") as raised:
        load_bundle_manifest(bundle)
    assert raised.value.fields["reason"] == "missing_module"
    assert raised.value.fields["module"] == "nvidia_uvm"


def test_a_missing_library_folder(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", {"nvidia": b"x"}, libraries="usr/lib/x86_64-linux-gnu")
    with pytest.raises(DriverBundleError, match="usr/lib/x86_64-linux-gnu") as raised:
        load_bundle_manifest(bundle)
    assert raised.value.fields["reason"] == "missing_folder"
    assert raised.value.fields["field"] == "libraries"


def test_kernel_version_must_match_the_guest_kernel(bundle: Path, tmp_path: Path) -> None:
    manifest = load_bundle_manifest(bundle)
    check_bundle_for_kernel(manifest, _stand_in_kernel(tmp_path, KERNEL_VERSION))
    with pytest.raises(
        DriverBundleError, match=re.escape(f"built for kernel {KERNEL_VERSION}")
    ) as raised:
        check_bundle_for_kernel(manifest, _stand_in_kernel(tmp_path, "6.1.0-28-cloud-amd64"))
    assert raised.value.fields == {
        "reason": "kernel_mismatch",
        "bundle_kernel_version": KERNEL_VERSION,
        "guest_kernel_version": "6.1.0-28-cloud-amd64",
    }


def test_gpu_machines_need_a_configured_bundle(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(DriverBundleError, match=DRIVER_BUNDLE_SETTING) as raised:
        configured_driver_bundle(None)
    assert raised.value.fields["reason"] == "not_configured"

    kernel = _stand_in_kernel(tmp_path, KERNEL_VERSION)
    disk = prepare_driver_bundle(kernel, tmp_path / "cache", bundle=bundle)
    assert read_file(disk, "/manifest.json") == (bundle / "manifest.json").read_bytes()
    other_kernel = _stand_in_kernel(tmp_path, "6.1.0-28-cloud-amd64")
    with pytest.raises(DriverBundleError, match="built for kernel"):
        prepare_driver_bundle(other_kernel, tmp_path / "cache", bundle=bundle)


# --- the disk


def test_folder_becomes_a_cached_ext4_disk_rebuilt_on_change(bundle: Path, tmp_path: Path) -> None:
    runner = RecordingRunner()
    cache = tmp_path / "cache"
    disk = ensure_driver_bundle_disk(bundle, cache, runner=runner)
    assert ensure_driver_bundle_disk(bundle, cache, runner=runner) == disk
    assert runner.programs().count("mke2fs -q") == 1

    assert (
        read_file(disk, f"/{GUEST_ENV_NAME}") == load_bundle_manifest(bundle).guest_env().encode()
    )
    assert read_file(disk, "/lib/libnvidia-fake.so.1") == LIBRARY
    assert list_dir(disk, "/bin")["nvidia-smi"] & 0o777 == 0o755
    assert set(list_dir(disk, "/modules")) == {"nvidia.ko", "nvidia_uvm.ko"}

    (bundle / "lib" / "libnvidia-fake.so.1").write_bytes(b"driver update\n")
    rebuilt = ensure_driver_bundle_disk(bundle, cache, runner=runner)
    assert rebuilt != disk
    assert runner.programs().count("mke2fs -q") == 2
    assert read_file(rebuilt, "/lib/libnvidia-fake.so.1") == b"driver update\n"


def test_digest_covers_content_modes_and_links(bundle: Path, tmp_path: Path) -> None:
    original = bundle_digest(bundle)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    assert bundle_digest(copy) == original

    (copy / "bin" / "nvidia-smi").chmod(0o644)
    assert bundle_digest(copy) != original
    (copy / "bin" / "nvidia-smi").chmod(0o755)
    (copy / "lib" / "libnvidia-fake.so").symlink_to("libnvidia-fake.so.1")
    with_link = bundle_digest(copy)
    assert with_link != original
    (copy / "lib" / "libnvidia-fake.so").unlink()
    (copy / "lib" / "libnvidia-fake.so").symlink_to("libnvidia-fake.so.2")
    assert bundle_digest(copy) not in (original, with_link)


def test_building_never_writes_into_the_bundle(bundle: Path, tmp_path: Path) -> None:
    stale = bundle / GUEST_ENV_NAME
    stale.write_text("DRIVER_MODULES=stale\n")
    disk = tmp_path / "out" / "bundle.ext4"
    build_driver_bundle_disk(bundle, disk)
    assert stale.read_text() == "DRIVER_MODULES=stale\n"
    assert (
        read_file(disk, f"/{GUEST_ENV_NAME}") == load_bundle_manifest(bundle).guest_env().encode()
    )


def test_a_ready_ext4_image_is_used_as_it_is(bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "operator" / "nvidia-550.ext4"
    built = build_driver_bundle_disk(bundle, image)
    cache = tmp_path / "cache"
    assert ensure_driver_bundle_disk(image, cache) == image
    assert not cache.exists()
    assert load_bundle_manifest(image) == built


def test_a_ready_image_is_checked_like_a_folder(bundle: Path, tmp_path: Path) -> None:
    without_guest_env = make_ext4(bundle, tmp_path / "plain.ext4")
    with pytest.raises(DriverBundleError, match=GUEST_ENV_NAME) as raised:
        load_bundle_manifest(without_guest_env)
    assert raised.value.fields["reason"] == "no_guest_env"

    (bundle / "modules" / "nvidia_uvm.ko").rename(bundle / "nvidia_uvm.ko")
    missing_module = make_ext4(bundle, tmp_path / "missing-module.ext4")
    with pytest.raises(DriverBundleError) as raised:
        load_bundle_manifest(missing_module)
    assert raised.value.fields["reason"] == "missing_module"

    not_ext4 = tmp_path / "bundle.tar"
    not_ext4.write_bytes(b"\0" * 4096)
    for check in (load_bundle_manifest, lambda path: ensure_driver_bundle_disk(path, tmp_path)):
        with pytest.raises(DriverBundleError, match="not an ext4 image") as raised:
            check(not_ext4)
        assert raised.value.fields["reason"] == "not_ext4"


# --- firmware


def test_a_bundle_without_its_gsp_firmware_is_refused(bundle: Path) -> None:
    """Current drivers boot the GPU's GSP firmware while probing: a Hopper GPU would not
    initialise in the guest."""
    for firmware in (bundle / "firmware/nvidia" / DRIVER_VERSION).iterdir():
        firmware.unlink()

    with pytest.raises(DriverBundleError, match="has no GSP firmware") as raised:
        load_bundle_manifest(bundle)

    assert raised.value.fields["reason"] == "missing_firmware"
    assert raised.value.fields["firmware"] == f"firmware/nvidia/{DRIVER_VERSION}/gsp_*.bin"


def test_gsp_firmware_of_another_driver_version_does_not_count(bundle: Path) -> None:
    (bundle / "firmware/nvidia" / DRIVER_VERSION).rename(bundle / "firmware/nvidia/535.183.01")

    with pytest.raises(DriverBundleError) as raised:
        load_bundle_manifest(bundle)

    assert raised.value.fields["reason"] == "missing_firmware"


def test_a_bundle_without_a_firmware_folder_names_the_field(bundle: Path) -> None:
    (bundle / "firmware/nvidia" / DRIVER_VERSION / "gsp_ga10x.bin").unlink()
    (bundle / "firmware/nvidia" / DRIVER_VERSION / "gsp_tu10x.bin").unlink()
    (bundle / "firmware/nvidia" / DRIVER_VERSION).rmdir()
    (bundle / "firmware/nvidia").rmdir()
    (bundle / "firmware").rmdir()

    with pytest.raises(DriverBundleError) as raised:
        load_bundle_manifest(bundle)

    assert (raised.value.fields["reason"], raised.value.fields["field"]) == (
        "missing_folder",
        "firmware",
    )


def test_every_firmware_file_a_module_names_must_be_shipped(bundle: Path) -> None:
    """What ``modinfo -F firmware nvidia`` lists for a 550 driver, one file missing."""
    named = [f"nvidia/{DRIVER_VERSION}/gsp_ga10x.bin", f"nvidia/{DRIVER_VERSION}/gsp_tu10x.bin"]

    def modinfo(argv: Any, **_: Any) -> str:
        words = [str(word) for word in argv]
        if words[:3] == ["modinfo", "-F", "firmware"] and words[3].endswith("/nvidia.ko"):
            return "\n".join([*named, f"nvidia/{DRIVER_VERSION}/gsp_gh100.bin"]) + "\n"
        return ""

    with pytest.raises(DriverBundleError, match=r"gsp_gh100\.bin") as raised:
        load_bundle_manifest(bundle, runner=modinfo)

    assert raised.value.fields == {
        "bundle": str(bundle),
        "reason": "missing_firmware",
        "module": "nvidia",
        "firmware": f"nvidia/{DRIVER_VERSION}/gsp_gh100.bin",
    }
    (bundle / "firmware/nvidia" / DRIVER_VERSION / "gsp_gh100.bin").write_bytes(b"GSP")
    assert load_bundle_manifest(bundle, runner=modinfo).firmware == "firmware"


def test_a_module_modinfo_cannot_read_names_no_firmware(bundle: Path) -> None:
    assert module_firmware(bundle / "modules" / "nvidia.ko") == []  # not an ELF module


def test_an_image_is_checked_for_firmware_too(bundle: Path, tmp_path: Path) -> None:
    for firmware in (bundle / "firmware/nvidia" / DRIVER_VERSION).iterdir():
        firmware.unlink()
    image = make_ext4(bundle, tmp_path / "no-gsp.ext4")

    with pytest.raises(DriverBundleError) as raised:
        load_bundle_manifest(image)

    assert raised.value.fields["reason"] == "missing_firmware"


# --- device nodes


def _proc_tree(root: Path, gpus: dict[str, int], modules: list[str], uvm_major: int) -> Path:
    """A copy of the /proc layout the NVIDIA driver leaves (driver 550, open modules)."""
    nvidia = root / "driver" / "nvidia"
    (nvidia / "gpus").mkdir(parents=True)
    (nvidia / "version").write_text(
        f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {DRIVER_VERSION}\n"
    )
    for address, minor in gpus.items():
        (nvidia / "gpus" / address).mkdir()
        (nvidia / "gpus" / address / "information").write_text(
            "Model: \t\t NVIDIA H200\nIRQ:   \t\t 39\nGPU UUID: \t GPU-5c5a0c5e\n"
            f"Bus Type: \t PCIe\nDMA Size: \t 52 bits\nBus Location: \t {address}\n"
            f"Device Minor: \t {minor}\nGPU Excluded:\t No\n"
        )
    (root / "modules").write_text(
        "".join(f"{name} 1892352 0 - Live 0x0000000000000000 (POE)\n" for name in modules)
    )
    (root / "devices").write_text(
        "Character devices:\n  1 mem\n  4 /dev/vc/0\n  5 /dev/tty\n195 nvidia\n195 nvidiactl\n"
        f"{uvm_major} nvidia-uvm\n236 nvidia-caps\n\nBlock devices:\n  7 loop\n254 virtblk\n"
    )
    return root


def _nvidia_nodes(proc: Path, tmp_path: Path) -> list[str]:
    script = tmp_path / "hangar-nvidia-nodes"
    script.write_bytes(nvidia_nodes_script())
    return subprocess.run(
        [str(HOST_BUSYBOX), "sh", str(script), str(proc)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()


def test_lists_the_device_nodes_the_driver_registered(tmp_path: Path) -> None:
    proc = _proc_tree(
        tmp_path / "proc",
        {"0000:00:05.0": 1, "0000:00:04.0": 0},
        ["nvidia_uvm", "nvidia_modeset", "nvidia"],
        uvm_major=237,
    )
    assert _nvidia_nodes(proc, tmp_path) == [
        "nvidiactl 195 255",
        "nvidia0 195 0",
        "nvidia1 195 1",
        "nvidia-modeset 195 254",
        "nvidia-uvm 237 0",
        "nvidia-uvm-tools 237 1",
    ]


def test_lists_no_device_nodes_without_the_driver(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "modules").write_text("dummy 16384 0 - Live 0x0000000000000000\n")
    (proc / "devices").write_text("Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n")
    assert _nvidia_nodes(proc, tmp_path) == []


def _xid_events(records: str, tmp_path: Path) -> list[str]:
    script = tmp_path / "hangar-xid-events"
    script.write_bytes(xid_events_script())
    return subprocess.run(
        [str(HOST_BUSYBOX), "sh", str(script)],
        input=records,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()


def test_xid_lines_of_the_kernel_log_become_control_events(tmp_path: Path) -> None:
    records = (
        "6,812,93810412,-;nvidia-modeset: Loading NVIDIA Kernel Mode Setting Driver\n"
        '4,813,93810499,-;NVRM: Xid (PCI:0000:01:00): 79, pid=1234, name=py "x" \\ y\n'
        "4,814,93810500,-;NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception\n"
        "NVRM: Xid (PCI:0000:02:00): 48, plain dmesg line\n"
    )

    events = [json.loads(line) for line in _xid_events(records, tmp_path)]

    assert events == [
        {"type": "xid", "line": 'NVRM: Xid (PCI:0000:01:00): 79, pid=1234, name=py "x" \\ y'},
        {"type": "xid", "line": "NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception"},
        {"type": "xid", "line": "NVRM: Xid (PCI:0000:02:00): 48, plain dmesg line"},
    ]


def test_xid_lines_are_cut_to_512_characters(tmp_path: Path) -> None:
    [event] = _xid_events("4,1,1,-;NVRM: Xid (PCI:0000:01:00): 79, " + "x" * 2000 + "\n", tmp_path)

    assert len(json.loads(event)["line"]) == 512


# --- real guests


@pytest.fixture(scope="module")
def real_module(guest_kernel: GuestKernel) -> bytes:
    """``dummy``: a module of the guest kernel, neither built in nor depending on another."""
    [path] = resolve_modules(guest_kernel.modules_dir, ["dummy"])
    return module_bytes(guest_kernel.modules_dir / path)


def _gpu_config(image: CachedImage, argv: list[str], **fields: Any) -> GuestRunConfig:
    return GuestRunConfig(
        machine_id="m-gpu",
        argv=argv,
        env={**image.config.env, "LD_LIBRARY_PATH": "/usr/local/lib"},
        hostname="m-gpu",
        driver_bundle=True,
        **fields,
    )


@pytest.mark.slow
def test_guest_loads_the_driver_and_sees_the_bundle_read_only(
    guest_kernel: GuestKernel,
    base_initrd: Path,
    cached_hello: CachedImage,
    real_module: bytes,
    tmp_path: Path,
) -> None:
    bundle = write_bundle(
        tmp_path / "bundle", {"dummy": real_module}, kernel_version=guest_kernel.version
    )
    check_bundle_for_kernel(load_bundle_manifest(bundle), guest_kernel)
    disk = ensure_driver_bundle_disk(bundle, tmp_path / "cache")
    script = "; ".join(
        [
            "grep '^dummy ' /proc/modules | cut -d' ' -f1",
            "cat /opt/hangar/driver/lib/libnvidia-fake.so.1",
            "nvidia-smi",
            'echo "$LD_LIBRARY_PATH"',
            "cat /etc/ld.so.conf.d/hangar-driver.conf",
            "grep ' /opt/hangar/driver ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1",
            "touch /opt/hangar/driver/lib/new 2>&1",
            "cat /tmp/ldconfig-ran",
            'echo "nvidia nodes: $(ls /dev | grep -c nvidia)"',
            "cat /sys/module/firmware_class/parameters/path; echo",
        ]
    )
    fake_ldconfig = b"#!/bin/sh\necho 'ldconfig ran' >/tmp/ldconfig-ran\n"
    config = _gpu_config(
        cached_hello,
        ["sh", "-c", script],
        files=[
            GuestFile(
                guest_path="/sbin/ldconfig",
                raw_value=base64.b64encode(fake_ldconfig).decode(),
                mode=0o755,
            )
        ],
    )
    result = boot(guest_kernel, base_initrd, cached_hello, config, tmp_path, read_only_disks=[disk])

    assert f"hangar-init: loaded NVIDIA driver {DRIVER_VERSION}" in result.console
    output = result.console.split("hangar-init: ready\n", 1)[1].splitlines()
    assert output[:10] == [
        "dummy",
        LIBRARY.decode().strip(),
        f"NVIDIA-SMI {DRIVER_VERSION} (hangar test bundle)",
        "/opt/hangar/driver/lib:/usr/local/lib",
        "/opt/hangar/driver/lib",
        "ro",
        "touch: /opt/hangar/driver/lib/new: Read-only file system",
        "ldconfig ran",
        "nvidia nodes: 0",  # a stand-in driver registers no NVIDIA devices
        "/run/driver/firmware",  # where the kernel looks for the GSP firmware
    ]
    assert result.ctl == [{"type": "ready"}, {"type": "exit", "code": 0}]


@pytest.mark.slow
def test_guest_does_not_run_without_its_driver(
    guest_kernel: GuestKernel, base_initrd: Path, cached_hello: CachedImage, tmp_path: Path
) -> None:
    bundle = write_bundle(
        tmp_path / "bundle",
        {"nvidia": b"not an ELF kernel module"},
        kernel_version=guest_kernel.version,
    )
    disk = ensure_driver_bundle_disk(bundle, tmp_path / "cache")
    config = _gpu_config(cached_hello, ["sh", "-c", "echo the process ran"])
    result = boot(guest_kernel, base_initrd, cached_hello, config, tmp_path, read_only_disks=[disk])

    message = f"cannot load kernel module nvidia of NVIDIA driver {DRIVER_VERSION}"
    assert result.ctl == [{"type": "error", "message": message}, {"type": "exit", "code": 127}]
    assert "the process ran" not in result.console


@pytest.mark.slow
def test_a_lone_hgx_gpu_loads_nvidia_with_nvlink_off_and_xid_lines_reach_the_host(
    guest_kernel: GuestKernel,
    base_initrd: Path,
    cached_hello: CachedImage,
    real_module: bytes,
    tmp_path: Path,
) -> None:
    """The stand-in ``nvidia`` module is the kernel's dummy (it ignores the unknown NVLink
    option). The process, root in its guest, writes a forged Xid line into the kernel log:
    exactly what a hostile tenant can do, which is why the host bounds and only ever
    quarantines on them."""
    bundle = write_bundle(
        tmp_path / "bundle", {"nvidia": real_module}, kernel_version=guest_kernel.version
    )
    disk = ensure_driver_bundle_disk(bundle, tmp_path / "cache")
    xid = "NVRM: Xid (PCI:0000:01:00): 79, pid=1, name=python, GPU has fallen off the bus."
    script = f"mknod /tmp/kmsg c 1 11 && echo '{xid}' >/tmp/kmsg && sleep 3"
    config = _gpu_config(cached_hello, ["sh", "-c", script])

    result = boot(
        guest_kernel,
        base_initrd,
        cached_hello,
        config,
        tmp_path,
        read_only_disks=[disk],
        kernel_args=[NVLINK_OFF_KERNEL_ARG],
    )

    assert (
        f"hangar-init: loaded NVIDIA driver {DRIVER_VERSION} (NVreg_NvLinkDisable=1)"
        in result.console
    )
    assert {"type": "xid", "line": xid} in result.ctl
    assert result.ctl[0] == {"type": "ready"} and result.ctl[-1] == {"type": "exit", "code": 0}
