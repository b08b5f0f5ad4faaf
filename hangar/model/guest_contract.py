"""The guest contract: every name hangar's host side and its guest init agree on, once.

The host side (the VMM driver, the agent, the initramfs builder, the network) reads the
names here; the guest's init (``hangar/images/guest/init`` and the scripts it runs) reads
the same names from ``/etc/hangar/contract.env``, which the base initramfs carries, rendered
from this module by :func:`contract_env`. The init spells none of them itself (a test checks).
"""

from __future__ import annotations

import enum
import shlex


class Port(enum.StrEnum):
    """The virtio-serial ports, by the names the guest finds them under."""

    CONTROL = "hangar.ctl"
    """Guest to host: JSON lines (ready, exit, error...), kept in the run dir's control log."""
    SIGNAL = "hangar.sig"
    """Host to guest: ``signal N`` lines for the machine's process."""
    EXEC = "hangar.exec"
    """Both ways: commands run in the guest (``hangar.vmm.guest_exec``)."""


class RunDir:
    """File names in a machine's run directory on the host."""

    ROOT_DISK = "root.qcow2"
    """A qcow2 overlay over the cached image: it costs what the machine writes."""
    INITRD = "initrd.img"
    CONSOLE_LOG = "console.log"
    CONTROL_LOG = "ctl.jsonl"
    CONSOLE_SOCKET = "console.sock"
    """The console as QEMU serves it; the host reads it with bounds into ``CONSOLE_LOG``."""
    CONTROL_SOCKET = "ctl.sock"
    """The control port as QEMU serves it; the host reads it with bounds into ``CONTROL_LOG``."""
    SIGNAL_SOCKET = "sig.sock"
    EXEC_SOCKET = "exec.sock"
    QMP_SOCKET = "qmp.sock"
    VMM_LOG = "vmm.log"
    SUSPEND_STATE = "suspend.vmstate"
    """The suspend snapshot (with ``suspend.vmstate.json``, its manifest: see
    :mod:`hangar.vmm.snapshot`)."""
    BOOT_FILES = (ROOT_DISK, INITRD)
    """Made anew for each cold boot from the image and the machine's config; kept while the
    machine is suspended (its snapshot was taken over them)."""


class CmdlineKey(enum.StrEnum):
    """Kernel command-line keys the host hands the guest's init (``KEY=value``)."""

    NET_MAC = "hangar.mac"
    NET_IP6 = "hangar.ip6"
    NET_GW6 = "hangar.gw6"
    NET_DNS = "hangar.dns"
    NET_IP4 = "hangar.ip4"
    NET_GW4 = "hangar.gw4"
    NVLINK = "hangar.nvlink"
    EXIT_ACK = "hangar.exitack"
    """``on``: the host reads the control port itself and answers the exit event."""


EXIT_ACK_ARG = f"{CmdlineKey.EXIT_ACK}=on"
"""On the kernel command line when the guest's init must wait for the host's answer to its
exit event before it powers off (what the host has not read when the VM ends is lost)."""
EXIT_ACK_REPLY = b"ack\n"
"""The host's answer to an exit event, on the control port."""


class InitrdPath:
    """Files of the initramfs (paths inside the archive, without the leading ``/``)."""

    CONTRACT_ENV = "etc/hangar/contract.env"
    MODULE_LIST = "etc/hangar/modules"
    RUN_JSON = "hangar/run.json"
    RUN_ENV = "hangar/run.env"
    HOSTNAME = "hangar/hostname"
    HOSTS = "hangar/hosts"
    FILES_DIR = "hangar/files"


EXEC_OUTPUT_CAP = 1 << 20
"""Bytes kept of each of a command's stdout and stderr (exec)."""
EXEC_STDIN_MAX = 1 << 20
EXEC_ARGV_MAX = 64 << 10
"""Bytes of a command's words, as sent."""

GUEST_KERNEL_CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet tsc=reliable no_timer_check"
ROOT_DEVICE = "/dev/vda"
"""The machine's writable root disk: the first disk."""
DRIVER_DEVICE = "/dev/vdb"
"""A GPU machine's driver bundle: the first extra disk, read-only."""


def contract_env() -> str:
    """``/etc/hangar/contract.env``: the contract as shell assignments for the guest's init."""
    values: dict[str, str] = {
        "PORT_CONTROL": Port.CONTROL,
        "PORT_SIGNAL": Port.SIGNAL,
        "PORT_EXEC": Port.EXEC,
        "ROOT_DEVICE": ROOT_DEVICE,
        "DRIVER_DEVICE": DRIVER_DEVICE,
        "MODULE_LIST": "/" + InitrdPath.MODULE_LIST,
        "RUN_ENV": "/" + InitrdPath.RUN_ENV,
        "HOSTNAME_FILE": "/" + InitrdPath.HOSTNAME,
        "HOSTS_FILE": "/" + InitrdPath.HOSTS,
        "FILES_DIR": "/" + InitrdPath.FILES_DIR,
        **{f"KEY_{key.name}": key.value for key in CmdlineKey},
        "EXEC_OUTPUT_CAP": str(EXEC_OUTPUT_CAP),
        "EXEC_STDIN_MAX": str(EXEC_STDIN_MAX),
        "EXEC_ARGV_MAX": str(EXEC_ARGV_MAX),
        "EXIT_ACK_ARG": EXIT_ACK_ARG,
    }
    return "".join(f"CONTRACT_{name}={shlex.quote(value)}\n" for name, value in values.items())
