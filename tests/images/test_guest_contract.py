"""The guest contract is spelled once: the guest's scripts read every name from
``/etc/hangar/contract.env`` (rendered from ``hangar.model.guest_contract``), never spell one
themselves, and use no contract variable the host does not define. (The boot tests, here and
in tests/vmm, run the real init against it.)"""

from __future__ import annotations

import re
from importlib import resources

import pytest

from hangar.model.guest_contract import (
    DRIVER_DEVICE,
    EXEC_ARGV_MAX,
    EXEC_OUTPUT_CAP,
    EXEC_STDIN_MAX,
    ROOT_DEVICE,
    CmdlineKey,
    InitrdPath,
    Port,
    contract_env,
)

SCRIPTS = ("init", "volumes", "xid-events", "nvidia-nodes")
BOOTSTRAP = "/" + InitrdPath.CONTRACT_ENV


def code_of(name: str) -> str:
    """The script without its comments (they may name what they describe)."""
    text = resources.files("hangar.images").joinpath("guest", name).read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def spelled_values() -> list[str]:
    paths = [
        "/" + path
        for path in (
            InitrdPath.MODULE_LIST,
            InitrdPath.RUN_JSON,
            InitrdPath.RUN_ENV,
            InitrdPath.HOSTNAME,
            InitrdPath.HOSTS,
            InitrdPath.FILES_DIR,
        )
    ]
    return [*Port, *CmdlineKey, ROOT_DEVICE, DRIVER_DEVICE, *paths]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_guest_scripts_spell_no_name_of_the_contract(script: str) -> None:
    code = code_of(script)
    spelled = [value for value in spelled_values() if value in code]
    assert spelled == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_contract_name_the_scripts_use_is_defined(script: str) -> None:
    defined = set(re.findall(r"^(CONTRACT_\w+)=", contract_env(), re.MULTILINE))
    used = set(re.findall(r"\$\{?(CONTRACT_\w+)", code_of(script)))
    assert used <= defined, sorted(used - defined)
    if used:
        assert BOOTSTRAP in code_of(script) or script == "init"


def test_the_exec_limits_are_the_contract_s() -> None:
    code = code_of("init")
    for name, value in (
        ("EXEC_OUTPUT_CAP", EXEC_OUTPUT_CAP),
        ("EXEC_ARGV_MAX", EXEC_ARGV_MAX),
        ("EXEC_STDIN_MAX", EXEC_STDIN_MAX),
    ):
        assert f"{name}=$CONTRACT_{name}\n" in code
        assert f"CONTRACT_{name}={value}\n" in contract_env()


def test_the_init_reads_the_contract_before_anything_else() -> None:
    lines = [line for line in code_of("init").splitlines() if line.strip()]
    assert lines[:3] == ["export PATH=/bin", f". {BOOTSTRAP}", "NEWROOT=/newroot"]
