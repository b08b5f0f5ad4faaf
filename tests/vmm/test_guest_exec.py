"""The host's end of the exec channel: requests it refuses, answers it reads, ps listings.

The guest's end runs in real guests in test_exec.py; here the answer bytes are fed to a real
asyncio stream, as they come off QEMU's socket.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from hangar.clock import ManualClock
from hangar.errors import InvalidRequest, RequestTooLarge
from hangar.vmm.driver import VmHandle
from hangar.vmm.errors import GuestExecError
from hangar.vmm.guest_exec import (
    ARGV_MAX,
    OUTPUT_CAP,
    STALE_MAX,
    STDIN_MAX,
    AnswerReader,
    ExecResult,
    encode_request,
    exec_in_guest,
    parse_processes,
)
from tests.vmm.machines import handle_for, plain_spec

REQUEST_ID = "0123456789abcdef"


def answer(
    request_id: str = REQUEST_ID,
    *,
    status: str = "ok",
    code: int = 0,
    timed_out: int = 0,
    stdout: bytes = b"",
    stderr: bytes = b"",
    cuts: tuple[int, int] = (0, 0),
) -> bytes:
    header = (
        f"HX1 {request_id} {status} {code} {timed_out} {len(stdout)} {cuts[0]} "
        f"{len(stderr)} {cuts[1]}\n"
    )
    return header.encode() + stdout + stderr + f"HX1 end {request_id}\n".encode()


async def read_answer(*pieces: bytes) -> ExecResult:
    reader = asyncio.StreamReader()
    for piece in pieces:
        reader.feed_data(piece)
    reader.feed_eof()
    return await AnswerReader(reader, REQUEST_ID).read()


async def test_an_answer_carries_any_bytes_and_its_flags() -> None:
    binary = bytes(range(256)) + b"\nHX1 end " + REQUEST_ID.encode() + b"\n"

    result = await read_answer(
        answer(code=3, timed_out=1, stdout=binary, stderr=b"oops\n", cuts=(1, 0))
    )

    assert result == ExecResult(
        exit_code=3,
        stdout=binary,
        stderr=b"oops\n",
        stdout_truncated=True,
        stderr_truncated=False,
        timed_out=True,
    )


async def test_what_an_abandoned_request_left_is_skipped() -> None:
    stale = answer("fedcba9876543210", stdout=b"x" * 1000)[:700]

    result = await read_answer(stale, answer(stdout=b"mine"))

    assert result.stdout == b"mine"


async def test_an_answer_split_anywhere_is_put_together() -> None:
    whole = answer(stdout=b"split me", stderr=b"and me")
    reader = asyncio.StreamReader()
    reading = asyncio.ensure_future(AnswerReader(reader, REQUEST_ID).read())
    for byte in whole:
        reader.feed_data(bytes([byte]))
        await asyncio.sleep(0)
    reader.feed_eof()

    assert (await reading).stderr == b"and me"


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param((b"",), id="nothing"),
        pytest.param((answer()[:-3],), id="cut-short"),
        pytest.param((answer().replace(b" ok 0 0", b" ok zero 0"),), id="bad-number"),
        pytest.param((answer(stdout=b"abc").replace(b"HX1 end", b"HX2 end"),), id="bad-trailer"),
        pytest.param(
            (f"HX1 {REQUEST_ID} ok 0 0 {OUTPUT_CAP + 1} 0 0 0\n".encode(),), id="too-long"
        ),
        pytest.param((b"z" * (STALE_MAX + 100),), id="endless-stale-bytes"),
    ],
)
async def test_a_broken_answer_is_an_error_not_a_hang(pieces: tuple[bytes, ...]) -> None:
    with pytest.raises(EOFError):
        await read_answer(*pieces)


async def test_a_refusal_from_the_guest_is_an_error() -> None:
    with pytest.raises(GuestExecError) as raised:
        await read_answer(answer(status="unknown_request", stderr=b"unknown request x\n"))

    assert "unknown request x" in str(raised.value)


def test_a_request_frames_the_command_as_shell_words() -> None:
    request = encode_request(REQUEST_ID, "run", "-", 2.5, b"echo 'a b'", b"in\0put")

    assert request == (
        f"HX1 {REQUEST_ID} run - 2.500 10 6\n".encode()
        + b"echo 'a b'in\0put"
        + f"HX1 end {REQUEST_ID}\n".encode()
    )


def handle_without_socket(tmp_path: Path, **changes: object) -> VmHandle:
    return handle_for(plain_spec(tmp_path), **changes)


@pytest.mark.parametrize(
    ("argv", "stdin", "timeout_s", "error", "field"),
    [
        ([], b"", 5.0, InvalidRequest, "cmd"),
        (["echo", "a\0b"], b"", 5.0, InvalidRequest, "cmd"),
        (["echo", "\udcff"], b"", 5.0, InvalidRequest, "cmd"),
        (["echo", "x" * ARGV_MAX], b"", 5.0, InvalidRequest, "cmd"),
        (["cat"], b"x" * (STDIN_MAX + 1), 5.0, RequestTooLarge, "stdin"),
        (["true"], b"", 0.0, InvalidRequest, "timeout"),
        (["true"], b"", 3601.0, InvalidRequest, "timeout"),
    ],
)
async def test_bad_commands_are_refused_before_reaching_the_guest(
    tmp_path: Path,
    argv: list[str],
    stdin: bytes,
    timeout_s: float,
    error: type[Exception],
    field: str,
) -> None:
    with pytest.raises(error) as raised:
        await exec_in_guest(
            handle_without_socket(tmp_path),
            argv,
            stdin=stdin,
            timeout_s=timeout_s,
            clock=ManualClock(),
        )

    assert getattr(raised.value, "fields", {})["field"] == field


async def test_no_channel_and_no_vmm_are_errors_that_say_so(tmp_path: Path) -> None:
    with pytest.raises(GuestExecError) as raised:
        await exec_in_guest(
            handle_without_socket(tmp_path, exec_socket=None),
            ["true"],
            timeout_s=5,
            clock=ManualClock(),
        )
    assert "without an exec channel" in str(raised.value)

    with pytest.raises(GuestExecError) as raised:
        await exec_in_guest(
            handle_without_socket(tmp_path), ["true"], timeout_s=5, clock=ManualClock()
        )
    assert raised.value.retryable is False


def ps_line(pid: int, cmdline: bytes, stat_name: str = "sh", uid: str = "0") -> str:
    encoded = base64.b64encode(cmdline).decode()
    stat = f"{pid} ({stat_name}) S 1 0 0 0 -1 4194560 171 119 0 0 5 38 0 22 20 0 1 0 1555 2314"
    return f"P\t{pid}\t{uid}\troot\t1648\t/srv\t{encoded}\t{stat}\n"


def test_a_ps_listing_becomes_processes_and_bad_lines_are_skipped() -> None:
    listing = (
        ps_line(142, b"sh\0-c\0echo a; sleep 1\0")
        + ps_line(9, b"", stat_name="odd) name (x")
        + "P\t12\tnot a process\n"
        + ps_line(13, b"x").replace("\teA==\t", "\t!!not base64\t")
    )

    processes = parse_processes(listing.encode())

    assert [p.pid for p in processes] == [9, 142]
    main = processes[1]
    assert main.argv == ["sh", "-c", "echo a; sleep 1"]
    assert main.command == "sh -c echo a; sleep 1"
    assert (main.ppid, main.uid, main.user, main.state) == (1, 0, "root", "S")
    assert main.directory == "/srv"
    assert main.rss_bytes == 1648 * 1024
    assert main.cpu_time_s == pytest.approx(0.43)
    assert main.started_after_boot_s == pytest.approx(15.55)
    assert processes[0].command == "[odd) name (x]"
