"""The README's "4 of 8 H100 SXM" table is what hangar produces, option for option."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.vmm.gpu_host import four_of_eight_h100_argv

HEADING = "#### What hangar runs for 4 of 8 H100 SXM"
# Options every machine has: the table leaves them out.
GENERIC_FLAGS = {"-name", "-display", "-kernel", "-initrd", "-append", "-drive", "-chardev",
                 "-serial", "-mon"}  # fmt: skip
GENERIC_SWITCHES = {"-nodefaults", "-no-user-config", "-no-reboot"}
GENERIC_DEVICES = ("virtio-blk-pci,", "virtio-serial-pci,", "virtserialport,")


def readme_table_options() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(HEADING, 1)[1]
    options: list[str] = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        match = re.match(r"^\| `([^`]+)` \|", line)
        if match:
            options += match.group(1).split(" ")
    return options


def gpu_options(argv: list[str]) -> list[str]:
    kept: list[str] = []
    words = iter(argv)
    for word in words:
        if word in GENERIC_SWITCHES or word == "qemu-system-x86_64":
            continue
        if word in GENERIC_FLAGS:
            next(words)
            continue
        if word == "-device":
            value = next(words)
            if not value.startswith(GENERIC_DEVICES):
                kept += [word, value]
            continue
        kept.append(word)
    return kept


def test_the_readme_table_is_the_command_line_hangar_produces(tmp_path: Path) -> None:
    table = readme_table_options()

    assert table, f"no table under {HEADING!r} in the README"
    assert table == gpu_options(four_of_eight_h100_argv(tmp_path))
