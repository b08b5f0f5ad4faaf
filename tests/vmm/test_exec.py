"""Exec and ps through the guest's exec channel, against one real guest (hangar's init over
the busybox test image) that the tests of this module share."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hangar.vmm.accel import AccelChoice
from hangar.vmm.driver import VmHandle, VmSpec
from hangar.vmm.guest_exec import OUTPUT_CAP
from hangar.vmm.qemu import QemuDriver
from tests.vmm.guest import ImageGuest, hang_guarded, wait_for_console
from tests.vmm.machines import Machines

pytestmark = pytest.mark.slow

MAIN = ["sh", "-c", "echo main is up; exec sleep 3600"]
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Booted:
    driver: QemuDriver
    handle: VmHandle
    spec: VmSpec


async def boot(driver: QemuDriver, spec: VmSpec) -> VmHandle:
    handle = await driver.launch(spec)
    await wait_for_console(spec.console_log, lambda text: "main is up" in text)
    return handle


@pytest.fixture(scope="module")
def guest(image_guest: ImageGuest, host_accel: AccelChoice) -> Iterator[Booted]:
    base = Path(tempfile.mkdtemp(prefix="hangar-exec-"))
    machines = Machines(image_guest, base)
    try:
        driver = QemuDriver(accel=host_accel)
        spec = machines.image_spec("exec", image_guest, MAIN)
        handle = machines.track(asyncio.run(asyncio.wait_for(boot(driver, spec), 180)))
        yield Booted(driver, handle, spec)
    finally:
        machines.kill_all()
        shutil.rmtree(base, ignore_errors=True)


@hang_guarded
async def test_a_command_runs_in_the_image_as_root_with_its_env(guest: Booted) -> None:
    result = await guest.driver.exec(
        guest.handle, ["sh", "-c", 'id -u; pwd; echo "$GREETING"; hostname'], timeout_s=TIMEOUT_S
    )

    assert result.exit_code == 0
    assert result.stdout == b"0\n/tmp\nhi\nexec\n"
    assert result.stderr == b""
    assert not (result.timed_out or result.stdout_truncated or result.stderr_truncated)


@hang_guarded
async def test_exit_codes_and_stderr_come_back(guest: Booted) -> None:
    result = await guest.driver.exec(
        guest.handle, ["sh", "-c", "echo to out; echo to err >&2; exit 42"], timeout_s=TIMEOUT_S
    )

    assert (result.exit_code, result.stdout, result.stderr) == (42, b"to out\n", b"to err\n")


@hang_guarded
async def test_a_missing_command_is_exit_127_with_a_message(guest: Booted) -> None:
    result = await guest.driver.exec(guest.handle, ["no-such-command"], timeout_s=TIMEOUT_S)

    assert result.exit_code == 127
    assert b"no-such-command" in result.stderr


@hang_guarded
async def test_stdin_and_binary_output_survive_the_channel(guest: Booted) -> None:
    data = bytes(range(256)) * 16 + b"\nHX1 end x\n\0"

    result = await guest.driver.exec(guest.handle, ["cat"], stdin=data, timeout_s=TIMEOUT_S)

    assert result.exit_code == 0
    assert result.stdout == data


@hang_guarded
async def test_arguments_reach_the_command_word_for_word(guest: Booted) -> None:
    words = ["a b", "'quoted'", '"double"', "$HOME", "line\nbreak", "*", ""]

    result = await guest.driver.exec(
        guest.handle,
        ["sh", "-c", 'for w; do printf "<%s>" "$w"; done', "sh", *words],
        timeout_s=TIMEOUT_S,
    )

    assert result.stdout == "".join(f"<{word}>" for word in words).encode()


@hang_guarded
async def test_output_past_the_cap_is_cut_and_flagged(guest: Booted) -> None:
    result = await guest.driver.exec(
        guest.handle,
        ["sh", "-c", f"head -c {OUTPUT_CAP + 5000} /dev/zero; echo small >&2"],
        timeout_s=TIMEOUT_S,
    )

    assert result.exit_code == 0
    assert result.stdout == b"\0" * OUTPUT_CAP
    assert result.stdout_truncated
    assert (result.stderr, result.stderr_truncated) == (b"small\n", False)


@hang_guarded
async def test_a_timeout_kills_the_command_and_what_it_started(guest: Booted) -> None:
    result = await guest.driver.exec(
        guest.handle,
        ["sh", "-c", "echo started; sleep 300 & sleep 301; echo never"],
        timeout_s=2,
    )

    assert result.timed_out
    assert result.exit_code == 137
    assert result.stdout == b"started\n"
    processes = await guest.driver.processes(guest.handle)
    assert not [p for p in processes if p.argv[:1] == ["sleep"] and p.argv[1:] != ["3600"]]


@hang_guarded
async def test_ps_lists_the_main_process_and_not_hangars_own(guest: Booted) -> None:
    processes = await guest.driver.processes(guest.handle)

    main = [p for p in processes if p.argv == ["sleep", "3600"]]
    assert len(main) == 1
    assert (main[0].user, main[0].uid, main[0].directory) == ("root", 0, "/tmp")
    assert main[0].rss_bytes > 0
    # init, its exec server and the ps itself run outside the image's root.
    assert 1 not in [p.pid for p in processes]
    assert all(p.argv[:1] != ["/init"] for p in processes)


@hang_guarded
async def test_execs_at_the_same_time_each_get_their_own_answer(guest: Booted) -> None:
    results = await asyncio.gather(
        *(
            guest.driver.exec(guest.handle, ["echo", f"call {index}"], timeout_s=TIMEOUT_S)
            for index in range(3)
        )
    )

    assert [result.stdout for result in results] == [f"call {i}\n".encode() for i in range(3)]


@hang_guarded
async def test_an_answer_nobody_waits_for_does_not_reach_the_next_caller(guest: Booted) -> None:
    abandoned = asyncio.ensure_future(
        guest.driver.exec(
            guest.handle,
            ["sh", "-c", "echo abandoned exec runs >/dev/console; sleep 1; echo late answer"],
            timeout_s=TIMEOUT_S,
        )
    )
    await wait_for_console(guest.spec.console_log, lambda text: "abandoned exec runs" in text)
    abandoned.cancel()  # as a caller that crashed would: the guest answers no one

    result = await guest.driver.exec(guest.handle, ["echo", "fresh"], timeout_s=TIMEOUT_S)

    assert (result.exit_code, result.stdout) == (0, b"fresh\n")
    with pytest.raises(asyncio.CancelledError):
        await abandoned
