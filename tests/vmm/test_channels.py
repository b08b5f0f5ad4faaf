"""The guest channel pump on real sockets: what a hostile guest writes is read at a bounded
rate, kept with a bounded size, parsed off the event loop, and a flood is logged once."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from hangar.vmm.channels import ChannelLimits, ChannelPump, previous_console_log, pump_console
from hangar.vmm.control import read_control_events

KIB = 1024
MIB = 1024 * KIB
GUARD_S = 30.0


def flood(peer: socket.socket, data: bytes, then: bytes = b"") -> threading.Thread:
    def write() -> None:
        try:
            peer.sendall(data)
            peer.sendall(then)
        except OSError:
            pass
        finally:
            peer.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_the_console_is_rotated_within_its_cap(tmp_path: Path) -> None:
    pump = ChannelPump(ChannelLimits(console_max_bytes=256 * KIB, rate_bytes=64 * MIB))
    ours, guests = socket.socketpair()
    log = tmp_path / "console.log"
    pump.attach("m1", "console", ours, log)
    flood(guests, b"chatty guest line\n" * 200_000)  # 3.6 MB
    assert pump.wait_done("m1", "console", GUARD_S)
    kept = log.stat().st_size + previous_console_log(log).stat().st_size
    assert kept <= 256 * KIB + 64 * KIB
    both = previous_console_log(log).read_bytes() + log.read_bytes()
    assert both.endswith(b"chatty guest line\n"), "the newest output is what is kept"
    pump.close()


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def poll(condition: object, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.01)


def test_a_channel_is_read_no_faster_than_its_rate(tmp_path: Path) -> None:
    rate = 256 * KIB
    clock = FrozenClock()
    pump = ChannelPump(ChannelLimits(rate_bytes=rate, burst_bytes=rate), clock=clock)
    ours, guests = socket.socketpair()
    pump.attach("m1", "console", ours, tmp_path / "console.log")
    writer = flood(guests, b"x" * (8 * MIB))
    poll(lambda: pump.bytes_read >= rate, "the burst is read")
    for second in range(1, 4):
        clock.now += 1.0
        poll(lambda s=second: pump.bytes_read >= rate * (1 + s), f"second {second} is read")
        assert pump.bytes_read <= rate * (1 + second), "no more than the rate allows"
    assert writer.is_alive(), "the guest is held back, not read as fast as it writes"
    pump.close()


def test_control_lines_are_parsed_bounded_and_a_flood_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ChannelLimits(
        control_max_bytes=4 * KIB, control_line_bytes=1 * KIB, rate_bytes=64 * MIB
    )
    pump = ChannelPump(limits)
    ours, guests = socket.socketpair()
    log = tmp_path / "ctl.jsonl"
    pump.attach("m1", "control", ours, log)
    events = b'{"type":"ready"}\n' + b"\n".join(
        json.dumps({"type": "log", "n": n}).encode() for n in range(1000)
    )
    garbage = b"not json at all\n" * 50_000 + b"y" * (5 * MIB) + b"\n"
    with caplog.at_level(logging.WARNING):
        flood(guests, events + b"\n" + garbage, then=b'{"type":"exit","code":3}\n')
        assert pump.wait_done("m1", "control", GUARD_S)
    assert log.stat().st_size <= 4 * KIB + 64 * 4 * KIB
    kept = read_control_events(log)
    assert kept[0] == {"type": "ready"}
    assert kept[-1] == {"type": "exit", "code": 3}, "the exit is kept past the cap"
    floods = [r for r in caplog.records if "flood from m1" in r.getMessage()]
    assert len(floods) == 1, [r.getMessage() for r in floods]
    pump.close()


def test_a_piped_console_keeps_its_bound_and_its_rate(tmp_path: Path) -> None:
    """The sandbox shim's console writer: 1 MiB in, at most the bound kept in two halves (the
    newest output whole), and the pipe read no faster than the rate (time injected)."""
    lines = b"".join(f"line {n:06d} {'x' * 80}\n".encode() for n in range(12_000))
    path = tmp_path / "console.log"
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limits = ChannelLimits(
        console_max_bytes=256 * 1024, rate_bytes=512 * 1024, burst_bytes=128 * 1024
    )
    pump_console(io.BufferedReader(io.BytesIO(lines)), path, limits, lambda: now[0], sleep)
    kept = path.read_bytes()
    previous = previous_console_log(path).read_bytes()
    assert len(kept) + len(previous) <= 256 * 1024 + 64 * 1024
    assert (previous + kept).endswith(lines[-1000:])
    # 1 MiB at 512 KiB/s after a 128 KiB burst: about 1.75 s of waiting, not less.
    assert sum(slept) >= (len(lines) - 128 * 1024) / (512 * 1024) - 0.05
