"""The host side of the signal port, against a unix socket peer that behaves as QEMU's
chardev does (reads while the guest reads, closes once it has read the end)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hangar.clock import ManualClock
from hangar.errors import InvalidRequest
from hangar.vmm.errors import SignalNotDelivered
from hangar.vmm.signal_port import send_guest_signal, signal_line
from tests.vmm.watched_clock import WatchedClock

TIMEOUT_S = 5.0


@pytest.mark.parametrize("signum", [0, -1, 65])
def test_signal_numbers_outside_linux_range_are_refused(signum: int) -> None:
    with pytest.raises(InvalidRequest):
        signal_line(signum)


async def test_line_is_delivered_to_a_reading_peer(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def reading_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()

    socket_path = tmp_path / "sig.sock"
    server = await asyncio.start_unix_server(reading_peer, path=str(socket_path))
    async with server:
        await send_guest_signal(socket_path, 15, clock=ManualClock(), timeout_s=TIMEOUT_S)

    assert received == [b"signal 15\n"]


async def test_a_peer_that_never_reads_means_not_delivered(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def stuck_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    socket_path = tmp_path / "sig.sock"
    clock = WatchedClock()
    server = await asyncio.start_unix_server(stuck_peer, path=str(socket_path))
    async with server:
        sending = asyncio.create_task(
            send_guest_signal(socket_path, 15, clock=clock, timeout_s=TIMEOUT_S)
        )
        await clock.advance_once_sleeping(TIMEOUT_S)
        with pytest.raises(SignalNotDelivered) as raised:
            await sending
        release.set()

    assert raised.value.fields == {"socket": str(socket_path), "signal": 15}


async def test_no_socket_means_not_delivered(tmp_path: Path) -> None:
    with pytest.raises(SignalNotDelivered):
        await send_guest_signal(
            tmp_path / "absent.sock", 15, clock=ManualClock(), timeout_s=TIMEOUT_S
        )
