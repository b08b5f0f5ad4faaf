"""Process identity from /proc (fixture trees) and pidfds (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.vmm.proc import ProcessRef, parse_stat, read_process


def stat_line(pid: int, comm: str, state: str, start_time: int) -> str:
    # The 52 fields of proc(5), field 22 (starttime) where the kernel puts it.
    fields = [str(pid), f"({comm})", state, "1", str(pid), str(pid), "0", "-1", "4194560"]
    fields += ["0"] * (21 - len(fields)) + [str(start_time)] + ["0"] * 30
    return " ".join(fields) + "\n"


def fake_proc(
    root: Path, pid: int, comm: str, state: str, start_time: int, argv: list[str]
) -> Path:
    directory = root / str(pid)
    directory.mkdir(parents=True)
    (directory / "stat").write_text(stat_line(pid, comm, state, start_time))
    (directory / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
    return root


def test_stat_fields_are_counted_after_the_command_name() -> None:
    assert parse_stat(stat_line(77, "a) (b c)", "S", 123456)) == ("S", 123456)


def test_our_own_start_time_matches_the_kernel_field() -> None:
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    assert parse_stat(stat)[1] == int(stat.rsplit(")", 1)[1].split()[19])


def test_process_is_read_from_the_proc_tree(tmp_path: Path) -> None:
    argv = ["qemu-system-x86_64", "-name", "hangar-m1", "-append", "console=ttyS0 quiet"]
    root = fake_proc(tmp_path, 4242, "qemu-system-x86", "S", 98765, argv)

    info = read_process(4242, root)

    assert info is not None
    assert (info.pid, info.state, info.start_time, info.cmdline) == (4242, "S", 98765, tuple(argv))
    assert not info.exited


def test_zombie_counts_as_exited(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, 4242, "qemu-system-x86", "Z", 98765, [])

    info = read_process(4242, root)

    assert info is not None and info.exited


def test_missing_pid_reads_as_none(tmp_path: Path) -> None:
    assert read_process(4242, tmp_path) is None


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "600"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


async def test_reference_waits_for_and_signals_the_right_process(
    sleeper: subprocess.Popen[bytes],
) -> None:
    info = read_process(sleeper.pid)
    assert info is not None

    process = ProcessRef.open(sleeper.pid, info.start_time)
    assert process is not None
    with process:
        assert not process.has_exited()
        process.send_signal(signal.SIGKILL)
        await process.wait_exited()
        assert process.has_exited()

    assert ProcessRef.open(sleeper.pid, info.start_time) is None


def test_reference_refuses_a_pid_started_at_another_time(
    sleeper: subprocess.Popen[bytes],
) -> None:
    info = read_process(sleeper.pid)
    assert info is not None

    assert ProcessRef.open(sleeper.pid, info.start_time - 1) is None
