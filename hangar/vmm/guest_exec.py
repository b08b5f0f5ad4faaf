"""The host's end of the guest exec channel: run a command inside a guest, list its processes.

hangar's guest init serves the virtio-serial port ``hangar.exec`` (the "exec channel" block of
``hangar/images/guest/init``); QEMU serves the host's end on the VM's ``exec_socket``, one
connection at a time. Nothing runs on the host. One request a connection::

    HX1 ID OP ARG TIMEOUT ARGV_LEN STDIN_LEN\\n ARGV STDIN HX1 end ID\\n

ARGV is the command as shell words (``shlex.join``), STDIN raw bytes; OP is ``run``, ``ps`` or
``resumed`` (ARG: the host's clock in whole seconds since the epoch, ``-`` otherwise). The
guest answers::

    HX1 ID STATUS EXIT_CODE TIMED_OUT OUT_LEN OUT_TRUNCATED ERR_LEN ERR_TRUNCATED\\n OUT ERR
    HX1 end ID\\n

Lengths count bytes, so any output survives. The guest blocks writing while no host is
connected, so the answer to a host that gave up reaches the next host first: every host
skips (a bounded amount of) what comes before its own ID.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from hangar.clock import Clock
from hangar.errors import InvalidRequest, RequestTooLarge
from hangar.model.guest_contract import EXEC_ARGV_MAX, EXEC_OUTPUT_CAP, EXEC_STDIN_MAX
from hangar.vmm.deadline import run_with_deadline
from hangar.vmm.driver import VmHandle
from hangar.vmm.errors import GuestExecError

PROTOCOL = "HX1"
OUTPUT_CAP = EXEC_OUTPUT_CAP
STDIN_MAX = EXEC_STDIN_MAX
ARGV_MAX = EXEC_ARGV_MAX
TIMEOUT_MAX_S = 3600.0
TRANSFER_MARGIN_S = 30.0
"""Time allowed beyond the command's own timeout to move the request and the answer."""
PS_TIMEOUT_S = 30.0
RESUMED_TIMEOUT_S = 5.0
HEADER_MAX = 512
STALE_MAX = 4 * (2 * OUTPUT_CAP + HEADER_MAX)
"""How much of an abandoned answer a host skips before its own (a few answers' worth)."""
READ_CHUNK = 64 << 10
CONNECT_RETRY_S = 0.05
GUEST_CLOCK_TICKS = 100
"""USER_HZ of the guest kernel: /proc/PID/stat counts CPU time in these."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    """The command's exit status; 128+N when signal N ended it (137 after a timeout)."""
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False


class GuestProcess(BaseModel):
    """A process in the guest's root (hangar's own processes in the guest are left out)."""

    pid: int
    ppid: int
    uid: int
    user: str
    state: str
    command: str
    argv: list[str]
    directory: str
    rss_bytes: int
    cpu_time_s: float
    started_after_boot_s: float


async def exec_in_guest(
    handle: VmHandle,
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    timeout_s: float,
    clock: Clock,
) -> ExecResult:
    """Run ``argv`` in the guest's root, as root, with the image's environment and working
    directory; it is killed (with what it started) after ``timeout_s``. Each of stdout and
    stderr keeps its first :data:`OUTPUT_CAP` bytes."""
    words = _check_command(argv, stdin, timeout_s)
    return await _exchange(
        handle, "run", "-", timeout_s, words, stdin, timeout_s + TRANSFER_MARGIN_S, clock
    )


async def list_guest_processes(
    handle: VmHandle, *, clock: Clock, timeout_s: float = PS_TIMEOUT_S
) -> list[GuestProcess]:
    """The processes in the guest's root: the machine's process, what it started, execs."""
    answer = await _exchange(handle, "ps", "-", timeout_s, b"", b"", timeout_s, clock)
    if answer.exit_code != 0:
        raise GuestExecError(
            f"the guest could not list its processes: {answer.stderr.decode(errors='replace')}",
            retryable=True,
            machine_id=handle.machine_id,
        )
    return parse_processes(answer.stdout)


async def tell_guest_resumed(
    handle: VmHandle, *, clock: Clock, timeout_s: float = RESUMED_TIMEOUT_S
) -> None:
    """After a restore: the guest sets its clock to the host's and notes the resume on its
    console (``hangar-init: resumed``)."""
    answer = await _exchange(
        handle, "resumed", str(int(clock.now())), timeout_s, b"", b"", timeout_s, clock
    )
    if answer.exit_code != 0:
        raise GuestExecError(
            f"the guest did not take the resume: {answer.stderr.decode(errors='replace')}",
            retryable=False,
            machine_id=handle.machine_id,
        )


def _check_command(argv: Sequence[str], stdin: bytes, timeout_s: float) -> bytes:
    if not argv:
        raise InvalidRequest("the command is empty", field="cmd")
    if any("\0" in word for word in argv):
        raise InvalidRequest("the command must not contain NUL", field="cmd")
    try:
        words = shlex.join(argv).encode()
    except UnicodeEncodeError as error:
        raise InvalidRequest("the command must be valid UTF-8", field="cmd") from error
    if len(words) > ARGV_MAX:
        raise InvalidRequest(
            f"the command is longer than {ARGV_MAX} bytes", field="cmd", limit=ARGV_MAX
        )
    if len(stdin) > STDIN_MAX:
        raise RequestTooLarge(
            f"stdin is longer than {STDIN_MAX} bytes", field="stdin", limit=STDIN_MAX
        )
    if not 0 < timeout_s <= TIMEOUT_MAX_S:
        raise InvalidRequest(
            f"timeout must be more than 0 and at most {TIMEOUT_MAX_S:g} s",
            field="timeout",
            limit=TIMEOUT_MAX_S,
        )
    return words


def encode_request(
    request_id: str, op: str, arg: str, timeout_s: float, words: bytes, stdin: bytes
) -> bytes:
    header = f"{PROTOCOL} {request_id} {op} {arg} {timeout_s:.3f} {len(words)} {len(stdin)}\n"
    return header.encode() + words + stdin + f"{PROTOCOL} end {request_id}\n".encode()


async def _exchange(
    handle: VmHandle,
    op: str,
    arg: str,
    timeout_s: float,
    words: bytes,
    stdin: bytes,
    deadline_s: float,
    clock: Clock,
) -> ExecResult:
    if handle.exec_socket is None:
        raise GuestExecError(
            f"machine {handle.machine_id} was started without an exec channel",
            retryable=False,
            machine_id=handle.machine_id,
        )
    request_id = secrets.token_hex(8)
    request = encode_request(request_id, op, arg, timeout_s, words, stdin)
    try:
        return await run_with_deadline(
            clock, deadline_s, _talk(handle.exec_socket, request, request_id, clock)
        )
    except TimeoutError as error:
        raise GuestExecError(
            f"the guest of machine {handle.machine_id} did not answer {op} within {deadline_s:g} s",
            retryable=True,
            machine_id=handle.machine_id,
        ) from error
    except (OSError, EOFError) as error:
        raise GuestExecError(
            f"the exec channel of machine {handle.machine_id} failed: "
            f"{getattr(error, 'strerror', None) or error}",
            retryable=False,
            machine_id=handle.machine_id,
        ) from error


async def _connect(
    socket_path: Path, clock: Clock
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection QEMU has accepted. QEMU serves one at a time with a backlog of one, so
    a connect may find the backlog full (another exec is in flight): try again until the
    caller's deadline. (asyncio's own connect would take that for success.)"""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(socket_path))
        except BlockingIOError:
            sock.close()
            await clock.sleep(CONNECT_RETRY_S)
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock)


async def _talk(socket_path: Path, request: bytes, request_id: str, clock: Clock) -> ExecResult:
    reader, writer = await _connect(socket_path, clock)

    async def send() -> None:
        writer.write(request)
        await writer.drain()

    # Read while writing: the guest may first have to finish an abandoned answer.
    sending = asyncio.ensure_future(send())
    try:
        return await AnswerReader(reader, request_id).read()
    finally:
        if not sending.done():
            sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sending
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class AnswerReader:
    """Reads one answer for ``request_id`` off a stream, skipping what comes before it."""

    def __init__(self, reader: asyncio.StreamReader, request_id: str) -> None:
        self._reader = reader
        self._request_id = request_id
        self._buffer = bytearray()

    async def read(self) -> ExecResult:
        await self._skip_to(f"{PROTOCOL} {self._request_id} ".encode())
        # The rest of the header: STATUS EXIT_CODE TIMED_OUT OUT_LEN OUT_CUT ERR_LEN ERR_CUT
        header = await self._line()
        fields = header.split()
        if len(fields) != 7:
            raise EOFError(f"malformed answer header {header[:HEADER_MAX]!r}")
        status = fields[0].decode(errors="replace")
        try:
            code, timed_out, out_len, out_cut, err_len, err_cut = (int(f) for f in fields[1:])
        except ValueError as error:
            raise EOFError(f"malformed answer header {header[:HEADER_MAX]!r}") from error
        if not (0 <= out_len <= OUTPUT_CAP and 0 <= err_len <= OUTPUT_CAP):
            raise EOFError(f"answer lengths {out_len} and {err_len} exceed {OUTPUT_CAP}")
        stdout = await self._exactly(out_len)
        stderr = await self._exactly(err_len)
        trailer = await self._line()
        if trailer != f"{PROTOCOL} end {self._request_id}".encode():
            raise EOFError(f"the answer does not end as it should: {trailer[:HEADER_MAX]!r}")
        if status != "ok":
            raise GuestExecError(
                f"the guest refused the request ({status}): {stderr.decode(errors='replace')}",
                retryable=False,
            )
        return ExecResult(
            exit_code=code,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=out_cut == 1,
            stderr_truncated=err_cut == 1,
            timed_out=timed_out == 1,
        )

    async def _more(self) -> None:
        chunk = await self._reader.read(READ_CHUNK)
        if not chunk:
            raise EOFError("the exec channel closed before the answer was complete")
        self._buffer += chunk

    async def _skip_to(self, marker: bytes) -> None:
        skipped = 0
        while (index := self._buffer.find(marker)) < 0:
            keep = len(marker) - 1
            if len(self._buffer) > keep:
                skipped += len(self._buffer) - keep
                del self._buffer[: len(self._buffer) - keep]
            if skipped > STALE_MAX:
                raise EOFError(f"more than {STALE_MAX} bytes came before the answer")
            await self._more()
        del self._buffer[: index + len(marker)]

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > HEADER_MAX:
                raise EOFError("an answer line is too long")
            await self._more()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    async def _exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            await self._more()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data


def parse_processes(listing: bytes) -> list[GuestProcess]:
    """The guest's ps listing: one ``P`` line a process (pid, uid, user, RSS in KiB,
    directory, base64 command line, /proc/PID/stat); lines that do not parse are skipped
    (a process may end while it is read)."""
    processes = []
    for line in listing.decode(errors="replace").splitlines():
        fields = line.split("\t", 7)
        if len(fields) != 8 or fields[0] != "P":
            continue
        process = _parse_process(fields[1:])
        if process is not None:
            processes.append(process)
    return sorted(processes, key=lambda process: process.pid)


def _parse_process(fields: list[str]) -> GuestProcess | None:
    pid, uid, user, rss_kib, directory, cmdline, stat = fields
    try:
        raw = base64.b64decode(cmdline, validate=True)
        open_paren, close_paren = stat.index("("), stat.rindex(")")
        after = stat[close_paren + 1 :].split()
        name = stat[open_paren + 1 : close_paren]
        argv = [word.decode(errors="replace") for word in raw.split(b"\0")[:-1]]
        return GuestProcess(
            pid=int(pid),
            ppid=int(after[1]),
            uid=int(uid),
            user=user or uid,
            state=after[0],
            command=" ".join(argv) if argv else f"[{name}]",
            argv=argv,
            directory=directory or "/",
            rss_bytes=int(rss_kib or 0) * 1024,
            cpu_time_s=(int(after[11]) + int(after[12])) / GUEST_CLOCK_TICKS,
            started_after_boot_s=int(after[19]) / GUEST_CLOCK_TICKS,
        )
    except (ValueError, IndexError, binascii.Error):
        return None
