"""Host -> guest signals: ``signal N`` lines written to the VMM's signal socket.

The VMM reads the socket only while the guest has its signal port open, and it drops
what it has not read when the host side closes. So the line is sent with a half-close
and the call waits for the VMM to close its side: that happens once it has read the
line and the end of input, i.e. once the line is on its way into the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from hangar.clock import Clock
from hangar.errors import InvalidRequest
from hangar.vmm.deadline import run_with_deadline
from hangar.vmm.errors import SignalNotDelivered

HIGHEST_SIGNAL = 64
MAX_ANSWER_BYTES = 64 * 1024
"""What the guest may write back on its signal port while a signal is delivered (nothing is
expected): past it the host stops reading and gives up on this delivery."""


def signal_line(signum: int) -> bytes:
    if not 1 <= signum <= HIGHEST_SIGNAL:
        raise InvalidRequest(
            f"signal {signum} is not between 1 and {HIGHEST_SIGNAL}", signal=signum
        )
    return f"signal {signum}\n".encode()


async def _until_closed(reader: asyncio.StreamReader, socket_path: Path, signum: int) -> None:
    """Read (and drop) until the VMM closes its side; a guest that floods the port back is
    cut off at :data:`MAX_ANSWER_BYTES` instead of filling the host's memory."""
    received = 0
    while chunk := await reader.read(4096):
        received += len(chunk)
        if received > MAX_ANSWER_BYTES:
            raise SignalNotDelivered(
                f"signal {signum}: the guest wrote more than {MAX_ANSWER_BYTES} bytes back on "
                "its signal port; not reading it",
                socket=str(socket_path),
                signal=signum,
            )


async def send_guest_signal(
    socket_path: Path, signum: int, *, clock: Clock, timeout_s: float
) -> None:
    """Hand ``signal signum`` to the VMM for the guest; raise if it is not taken."""
    line = signal_line(signum)
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError as error:
        raise SignalNotDelivered(
            f"cannot reach the signal socket {socket_path}: {error.strerror or error}",
            socket=str(socket_path),
            signal=signum,
        ) from error
    try:
        writer.write(line)
        await writer.drain()
        writer.write_eof()
        await run_with_deadline(clock, timeout_s, _until_closed(reader, socket_path, signum))
    except TimeoutError as error:
        raise SignalNotDelivered(
            f"signal {signum} not taken within {timeout_s} s: the guest is not reading its "
            "signal port",
            socket=str(socket_path),
            signal=signum,
        ) from error
    except OSError as error:
        raise SignalNotDelivered(
            f"signal {signum} not delivered through {socket_path}: {error}",
            socket=str(socket_path),
            signal=signum,
        ) from error
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
