"""A stand-in for NVIDIA's gpu-admin-tools (``nvidia_gpu_tools.py``) on a fixture host.

It answers the CC and PPCIe options hangar uses from the fixture host's GPU state
(``gpu-hw.json`` beside ``$HANGAR_TEST_SYSFS``), printing lines shaped like the tool's own
log lines, and refuses, as the tool does, a GPU the nvidia driver holds.
Run as ``python fake_gpu_tools.py --gpu-bdf=BDF OPTIONS...``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    sysfs = Path(os.environ["HANGAR_TEST_SYSFS"])
    bdf = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--gpu-bdf="))
    driver = sysfs / "bus/pci/devices" / bdf / "driver"
    if driver.is_symlink() and os.readlink(driver).endswith("/nvidia"):
        print(f"ERROR GPU {bdf} has the nvidia driver loaded; unbind it first", file=sys.stderr)
        return 1
    with open(sysfs.parent / "gpu-hw.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as tests.devices.gpu_hw.hardware_lock
        return _answer(sysfs.parent / "gpu-hw.json", bdf, argv)


def _answer(hw_file: Path, bdf: str, argv: list[str]) -> int:
    state = json.loads(hw_file.read_text()) if hw_file.exists() else {}
    gpu = state.setdefault(bdf, {})
    for arg in argv:
        for name, label in (("cc", "CC"), ("ppcie", "PPCIe")):
            current, pending = gpu.get(name, ["off", "off"])
            if arg == f"--query-{name}-mode":
                print(f"2025-01-01,00:00:00.000 INFO GPU {bdf} H100 {label} mode is {current}")
            elif arg == f"--query-{name}-settings":
                print(f"2025-01-01,00:00:00.000 INFO GPU {bdf} H100 {label} settings:")
                print(f"2025-01-01,00:00:00.000 INFO   enable = {int(pending != 'off')}")
                if name == "cc":
                    devtools = int(pending == "devtools")
                    print(f"2025-01-01,00:00:00.000 INFO   enable-devtools = {devtools}")
            elif arg.startswith(f"--set-{name}-mode="):
                gpu[name] = [current, arg.split("=", 1)[1]]
                partial = hw_file.with_suffix(".tools")
                partial.write_text(json.dumps(state))
                partial.replace(hw_file)
                print(f"INFO GPU {bdf} {label} mode set to {gpu[name][1]}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
