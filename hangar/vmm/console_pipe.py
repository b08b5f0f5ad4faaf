"""The sandbox shim's console writer: ``python -m hangar.vmm.console_pipe PATH MAX RATE`` copies
its standard input (the container's output) into the machine's console log with a VM
console's bounds (``hangar.vmm.channels.pump_console``): MAX bytes kept in two rotated halves,
RATE bytes a second at most, the container waiting on its pipe past that."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hangar.vmm.channels import ChannelLimits, pump_console


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m hangar.vmm.console_pipe PATH MAX_BYTES RATE_BYTES", file=sys.stderr)
        return 2
    path, max_bytes, rate = Path(argv[0]), int(argv[1]), int(argv[2])
    limits = ChannelLimits(
        console_max_bytes=max_bytes, rate_bytes=rate, burst_bytes=max(rate, 1024 * 1024)
    )
    with open(sys.stdin.fileno(), "rb", closefd=False) as source:
        pump_console(source, path, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
