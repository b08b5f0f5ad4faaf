"""The QEMU command line a spec turns into, and the checks before it runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.errors import VmmError
from hangar.model.guest_contract import EXIT_ACK_ARG, GUEST_KERNEL_CMDLINE
from hangar.vmm.accel import AccelChoice, kvm_choice, tcg_choice
from hangar.vmm.driver import DiskSpec, NicSpec, VmSpec
from hangar.vmm.qemu import QemuDriver
from hangar.vmm.qemu_argv import HUGEPAGES_DIR, check_spec_files, qemu_argv, snapshot_fingerprint

TCG = tcg_choice("test")
KVM = kvm_choice("test")
GPUS = ["0000:17:00.0", "0000:65:00.0"]
NIC = NicSpec(tap="hgt0123456789ab", mac="06:12:34:56:78:9a")


def make_spec(root: Path, **changes: object) -> VmSpec:
    for name in ("vmlinuz", "initrd", "root.ext4", "bundle.img", "scratch.img"):
        (root / name).touch()
    spec = VmSpec.in_run_dir(
        machine_id="m1",
        run_dir=root / "run",
        kernel=root / "vmlinuz",
        initrd=root / "initrd",
        root_disk=root / "root.ext4",
        extra_disks=[
            DiskSpec(path=root / "bundle.img", read_only=True),
            DiskSpec(path=root / "scratch.img"),
        ],
        cpus=2,
        memory_mb=512,
        kernel_args=["hangar.debug=1"],
    )
    return spec.model_copy(update=changes)


def argv_for(
    spec: VmSpec, accel: AccelChoice = TCG, hugepages_dir: Path = HUGEPAGES_DIR
) -> list[str]:
    return QemuDriver(accel=accel, hugepages_dir=hugepages_dir).prepare(spec)


def values_of(argv: list[str], flag: str) -> list[str]:
    return [value for option, value in itertools.pairwise(argv) if option == flag]


def test_tcg_runs_q35_with_the_max_cpu(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path), TCG)

    assert values_of(argv, "-machine") == ["q35"]
    assert values_of(argv, "-accel") == ["tcg"]
    assert values_of(argv, "-cpu") == ["max"]


def test_kvm_runs_microvm_with_the_host_cpu(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path), KVM)

    assert values_of(argv, "-machine") == ["microvm,isa-serial=on,pcie=on"]
    assert values_of(argv, "-accel") == ["kvm"]
    assert values_of(argv, "-cpu") == ["host"]


def test_the_process_is_named_after_the_machine_and_starts_bare(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path))

    assert argv[0] == "qemu-system-x86_64"
    assert values_of(argv, "-name") == ["hangar-m1"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert values_of(argv, "-smp") == ["2"]
    assert values_of(argv, "-m") == ["512M"]


def test_kernel_command_line_is_the_guest_contract_plus_extras(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = argv_for(spec)

    assert values_of(argv, "-kernel") == [str(spec.kernel)]
    assert values_of(argv, "-initrd") == [str(spec.initrd)]
    assert values_of(argv, "-append") == [f"{GUEST_KERNEL_CMDLINE} hangar.debug=1 {EXIT_ACK_ARG}"]


def test_root_disk_comes_first_and_read_only_disks_stay_read_only(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path))

    assert values_of(argv, "-drive") == [
        f"id=disk0,file={tmp_path / 'root.ext4'},format=raw,if=none",
        f"id=disk1,file={tmp_path / 'bundle.img'},format=raw,if=none,readonly=on",
        f"id=disk2,file={tmp_path / 'scratch.img'},format=raw,if=none",
    ]
    blk_devices = [d for d in values_of(argv, "-device") if d.startswith("virtio-blk-pci")]
    assert blk_devices == [f"virtio-blk-pci,drive=disk{i}" for i in range(3)]


def test_console_control_signal_and_monitor_channels(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = argv_for(spec)

    chardevs = values_of(argv, "-chardev")
    # The host reads the console and control port with bounds; QEMU waits for the console.
    assert f"socket,id=console,path={spec.console_socket},server=on,wait=on" in chardevs
    assert f"socket,id=ctl,path={spec.control_socket},server=on,wait=off" in chardevs
    assert f"socket,id=sig,path={spec.signal_socket},server=on,wait=off" in chardevs
    assert f"socket,id=qmp,path={spec.qmp_socket},server=on,wait=off" in chardevs
    assert values_of(argv, "-serial") == ["chardev:console"]
    assert values_of(argv, "-mon") == ["chardev=qmp,mode=control"]
    devices = values_of(argv, "-device")
    assert "virtio-serial-pci,id=vs" in devices
    assert "virtserialport,bus=vs.0,chardev=ctl,name=hangar.ctl" in devices
    assert "virtserialport,bus=vs.0,chardev=sig,name=hangar.sig" in devices
    assert f"socket,id=exec,path={spec.exec_socket},server=on,wait=off" in chardevs
    assert "virtserialport,bus=vs.0,chardev=exec,name=hangar.exec" in devices


def test_a_cold_boot_starts_the_vcpus_and_truncates_its_logs(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path))

    assert "-incoming" not in argv
    assert "-S" not in argv
    assert not [c for c in values_of(argv, "-chardev") if "append=on" in c]


def test_a_restore_loads_the_snapshot_paused_and_appends_to_the_logs(tmp_path: Path) -> None:
    snapshot = tmp_path / "my snapshot's state"
    spec = make_spec(tmp_path, incoming_snapshot=snapshot)
    argv = argv_for(spec)

    assert values_of(argv, "-incoming") == [f"exec:cat '{tmp_path}/my snapshot'\"'\"'s state'"]
    assert "-S" in argv
    cold = argv_for(spec.model_copy(update={"incoming_snapshot": None}))
    assert values_of(argv, "-device") == values_of(cold, "-device")
    # The channels are the sockets the host reads and appends to the logs from...
    assert values_of(argv, "-chardev") == values_of(cold, "-chardev")
    # ...or, without them, files QEMU appends to itself.
    files = spec.model_copy(update={"console_socket": None, "control_socket": None})
    chardevs = values_of(argv_for(files), "-chardev")
    assert f"file,id=console,path={spec.console_log},append=on" in chardevs
    assert f"file,id=ctl,path={spec.control_log},append=on" in chardevs


def test_the_snapshot_fingerprint_leaves_paths_out_but_not_devices(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    here = make_spec(tmp_path / "a")
    moved = make_spec(tmp_path / "b", incoming_snapshot=tmp_path / "state")

    def fingerprint(spec: VmSpec) -> list[str]:
        return snapshot_fingerprint(spec, TCG, hugepages_dir=HUGEPAGES_DIR)

    assert fingerprint(here) == fingerprint(moved)
    assert not [word for word in fingerprint(here) if str(tmp_path) in word]
    assert fingerprint(here) != fingerprint(here.model_copy(update={"memory_mb": 1024}))
    assert fingerprint(here) != fingerprint(here.model_copy(update={"extra_disks": []}))
    assert fingerprint(here) != snapshot_fingerprint(here, KVM, hugepages_dir=HUGEPAGES_DIR)


def test_without_channel_sockets_qemu_writes_the_files(tmp_path: Path) -> None:
    spec = make_spec(tmp_path).model_copy(update={"console_socket": None, "control_socket": None})
    chardevs = values_of(argv_for(spec), "-chardev")
    assert f"file,id=console,path={spec.console_log}" in chardevs
    assert f"file,id=ctl,path={spec.control_log}" in chardevs


def test_each_gpu_is_passed_through_by_vfio(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path, gpus=GPUS))

    vfio_devices = [d for d in values_of(argv, "-device") if d.startswith("vfio-pci")]
    assert vfio_devices == [f"vfio-pci,host={bdf}" for bdf in GPUS]


def test_no_gpu_means_no_vfio(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path))

    assert not [d for d in values_of(argv, "-device") if d.startswith("vfio-pci")]


def test_a_nic_is_virtio_net_on_the_hosts_tap_with_its_mac(tmp_path: Path) -> None:
    argv = qemu_argv(make_spec(tmp_path, nic=NIC), TCG)

    assert values_of(argv, "-netdev") == [
        "tap,id=net0,ifname=hgt0123456789ab,script=no,downscript=no"
    ]
    assert "virtio-net-pci,netdev=net0,mac=06:12:34:56:78:9a" in values_of(argv, "-device")


def test_no_nic_means_no_network_device(tmp_path: Path) -> None:
    argv = argv_for(make_spec(tmp_path))

    assert "-netdev" not in argv
    assert not [d for d in values_of(argv, "-device") if d.startswith("virtio-net")]


def test_a_tap_that_does_not_exist_is_named(tmp_path: Path) -> None:
    net_class = tmp_path / "class-net"
    net_class.mkdir()
    spec = make_spec(tmp_path, nic=NIC)

    with pytest.raises(VmmError) as raised:
        check_spec_files(spec, net_class_dir=net_class)
    assert raised.value.fields["field"] == "nic.tap"

    (net_class / NIC.tap).mkdir()
    check_spec_files(spec, net_class_dir=net_class)


def test_hugepages_back_guest_memory_with_a_shared_file(tmp_path: Path) -> None:
    hugepages = tmp_path / "hugepages"
    hugepages.mkdir()

    argv = argv_for(make_spec(tmp_path, hugepages=True), KVM, hugepages_dir=hugepages)

    assert values_of(argv, "-object") == [
        f"memory-backend-file,id=ram0,size=512M,mem-path={hugepages},share=on,prealloc=on"
    ]
    assert values_of(argv, "-machine") == ["microvm,isa-serial=on,pcie=on,memory-backend=ram0"]


def test_hugepages_without_a_hugetlbfs_mount_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VmmError) as raised:
        argv_for(make_spec(tmp_path, hugepages=True), hugepages_dir=tmp_path / "absent")

    assert raised.value.fields["field"] == "hugepages"


def test_commas_in_paths_are_doubled_inside_options(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    spec = make_spec(odd)
    argv = argv_for(spec)

    assert f"id=disk0,file={tmp_path}/a,,b/root.ext4,format=raw,if=none" in argv
    assert f"socket,id=ctl,path={tmp_path}/a,,b/run/ctl.sock,server=on,wait=off" in argv
    assert values_of(argv, "-kernel") == [f"{tmp_path}/a,b/vmlinuz"]


@pytest.mark.parametrize("field", ["kernel", "initrd", "root_disk"])
def test_a_missing_input_file_is_named(tmp_path: Path, field: str) -> None:
    spec = make_spec(tmp_path)
    getattr(spec, field).unlink()

    with pytest.raises(VmmError) as raised:
        argv_for(spec)

    assert raised.value.fields["field"] == field
    assert raised.value.fields["path"] == str(getattr(spec, field))


def test_a_missing_extra_disk_is_named_by_position(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    (tmp_path / "scratch.img").unlink()

    with pytest.raises(VmmError) as raised:
        argv_for(spec)

    assert raised.value.fields["field"] == "extra_disks[1]"


@pytest.mark.parametrize("field", ["qmp_socket", "exec_socket"])
def test_a_socket_path_too_long_for_unix_sockets_is_refused(tmp_path: Path, field: str) -> None:
    spec = make_spec(tmp_path, **{field: tmp_path / ("q" * 120)})

    with pytest.raises(VmmError) as raised:
        argv_for(spec)

    assert raised.value.fields["field"] == field


@pytest.mark.parametrize(
    "changes",
    [
        {"gpus": ["17:00.0"]},
        {"gpus": ["0000:17:00.0", "0000:17:00.0"]},
        {"machine_id": "m1,x"},
        {"kernel_args": ["two words"]},
        {"cpus": 0},
        {"nic": {"tap": "hgt1,script=/x", "mac": "06:12:34:56:78:9a"}},
        {"nic": {"tap": "hgt0123456789abc", "mac": "06:12:34:56:78:9a"}},
        {"nic": {"tap": "hgt1", "mac": "06:12:34:56:78"}},
    ],
)
def test_spec_rejects_values_qemu_would_misread(tmp_path: Path, changes: dict[str, object]) -> None:
    fields = make_spec(tmp_path).model_dump() | changes

    with pytest.raises(ValidationError):
        VmSpec.model_validate(fields)
