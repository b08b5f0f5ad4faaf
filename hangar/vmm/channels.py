"""What a guest writes to the host, read with bounds: its console and its control port.

A guest is root in its VM and may write as fast and as much as it likes. So QEMU does not
write these channels to files itself: each is a unix socket QEMU serves, and one thread of
the host (:class:`ChannelPump`, never the event loop) reads every machine's channels

- at most ``rate_bytes`` a second each (a token bucket): a channel past it is simply not
  read for a while, and QEMU then stops taking the guest's output (virtio-serial and the
  UART both wait for the host), so a chatty guest slows itself down, not the host;
- into files with a size bound: the console into two halves rotated at
  ``console_max_bytes / 2`` (``console.log`` and ``console.log.1``); the control port
  line by line, each line at most ``control_line_bytes``, parsed here (off the event loop),
  and kept only if it is a control event, up to ``control_max_bytes`` a boot (then only
  ``exit`` and ``error`` events, a bounded number more);
- and a flood (lines dropped, the control log full) is logged once per episode.

Each ``exit`` event kept is acknowledged (``EXIT_ACK_REPLY`` on the port): the guest's init
waits for it before it powers off, since what the host has not read yet when QEMU exits is
lost.

While the agent is down nobody reads: the guest's control writes wait (nothing is lost), its
console output is dropped by QEMU. An adopted VM's channels are attached again.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hangar.model.guest_contract import EXIT_ACK_REPLY
from hangar.ratelimit import FloodLog

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
READ_CHUNK = 64 * KIB
CONSOLE_PREVIOUS_SUFFIX = ".1"
ESSENTIAL_EVENTS = frozenset({"exit", "error"})
ESSENTIAL_EXTRA_LINES = 64
ESSENTIAL_LINE_BYTES = 4 * KIB


def previous_console_log(console_log: Path) -> Path:
    """Where the older half of a machine's console log is (after a rotation)."""
    return console_log.with_name(console_log.name + CONSOLE_PREVIOUS_SUFFIX)


@dataclass(frozen=True)
class ChannelLimits:
    console_max_bytes: int = 8 * MIB
    """Console output kept per machine, both halves together."""
    rate_bytes: int = 512 * KIB
    """Bytes a second read from each channel."""
    burst_bytes: int = 1 * MIB
    control_max_bytes: int = 1 * MIB
    """Control events kept per boot."""
    control_line_bytes: int = 64 * KIB


class _Bucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, now

    def available(self, now: float) -> int:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return int(self.tokens)

    def spend(self, amount: int) -> None:
        self.tokens -= amount

    def wait_s(self) -> float:
        return max(0.01, (1.0 - self.tokens) / self.rate)


class _ConsoleSink:
    def __init__(self, path: Path, limits: ChannelLimits) -> None:
        self.path = path
        self._half = max(READ_CHUNK, limits.console_max_bytes // 2)
        self._file: IO[bytes] = self._open()

    def _open(self) -> IO[bytes]:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(descriptor, "ab")

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        if self._file.tell() >= self._half:
            self._file.close()
            os.replace(self.path, previous_console_log(self.path))
            self._file = self._open()

    def close(self) -> None:
        self._file.close()


def pump_console(
    source: io.BufferedIOBase,
    path: Path,
    limits: ChannelLimits,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Copy ``source`` (a process's output, to its end) into the console log at ``path`` with
    a VM console's bounds: the same two rotated halves, read at most ``rate_bytes`` a second
    (past it the pipe is not read for a while, so the writer waits, as a VM's UART does)."""
    sink = _ConsoleSink(path, limits)
    bucket = _Bucket(limits.rate_bytes, limits.burst_bytes, clock())
    try:
        while True:
            allowed = bucket.available(clock())
            if allowed < 1:
                sleep(bucket.wait_s())
                continue
            data = source.read1(min(READ_CHUNK, allowed))
            if not data:
                return
            bucket.spend(len(data))
            sink.write(data)
    finally:
        sink.close()


class _ControlSink:
    """Guest lines in, control events out (one JSON line each), bounded."""

    def __init__(
        self, path: Path, limits: ChannelLimits, machine_id: str, floods: FloodLog
    ) -> None:
        self.path = path
        self._limits = limits
        self._machine_id = machine_id
        self._floods = floods
        self._partial = bytearray()
        self._skipping = False
        self._stored = path.stat().st_size if path.exists() else 0
        self._essential_left = ESSENTIAL_EXTRA_LINES
        self.on_exit: Callable[[], None] = lambda: None
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: IO[bytes] = os.fdopen(descriptor, "ab")

    def write(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            piece = data[start:end]
            if not self._skipping:
                if len(self._partial) + len(piece) > self._limits.control_line_bytes:
                    self._drop("a control line longer than its limit")
                    self._partial.clear()
                    self._skipping = True
                else:
                    self._partial += piece
            if newline < 0:
                break
            if not self._skipping:
                self._line(bytes(self._partial))
            self._partial.clear()
            self._skipping = False
            start = newline + 1
        self._file.flush()

    def finish(self) -> None:
        """The channel ended: a last line without its newline counts if it parses."""
        if self._partial and not self._skipping:
            self._line(bytes(self._partial), last=True)
        self._partial.clear()
        self._file.flush()

    def _line(self, line: bytes, last: bool = False) -> None:
        if not line.strip():
            return
        event = parse_control_line(line)
        if event is None:
            if not last:
                self._drop("lines that are not control events")
            return
        rendered = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        if self._stored + len(rendered) > self._limits.control_max_bytes:
            essential = event["type"] in ESSENTIAL_EVENTS
            if not essential or self._essential_left <= 0:
                self._drop("more control events than a boot may keep")
                return
            if len(rendered) > ESSENTIAL_LINE_BYTES:
                rendered = json.dumps(_shortened(event)).encode() + b"\n"
            self._essential_left -= 1
        self._file.write(rendered)
        self._stored += len(rendered)
        if event["type"] == "exit":
            self._file.flush()
            self.on_exit()

    def _drop(self, what: str) -> None:
        self._floods.note(self._machine_id, what)

    def close(self) -> None:
        self._file.close()


def _shortened(event: dict[str, Any]) -> dict[str, Any]:
    short: dict[str, Any] = {"type": event["type"]}
    if isinstance(event.get("code"), int):
        short["code"] = event["code"]
    if "message" in event:
        short["message"] = str(event["message"])[:1024]
    return short


def parse_control_line(line: bytes) -> dict[str, Any] | None:
    """A control event (a JSON object with a string ``type``), or None."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value
    return None


@dataclass
class _Channel:
    machine_id: str
    kind: str
    sock: socket.socket
    sink: _ConsoleSink | _ControlSink
    bucket: _Bucket
    done: threading.Event = field(default_factory=threading.Event)
    throttled_until: float = 0.0


class ChannelPump:
    """One thread that reads every machine's console and control sockets, with bounds."""

    def __init__(
        self, limits: ChannelLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ChannelLimits()
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str], _Channel] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self.floods = FloodLog(log, "guest control ports")
        self.bytes_read = 0

    # attaching
    def attach(
        self,
        machine_id: str,
        kind: str,
        sock: socket.socket,
        sink_path: Path,
    ) -> None:
        """Read the connected ``sock`` (``kind``: ``console`` or ``control``) into
        ``sink_path`` from now on; an earlier channel of that machine and kind is closed."""
        sock.setblocking(False)
        sink: _ConsoleSink | _ControlSink
        if kind == "console":
            sink = _ConsoleSink(sink_path, self.limits)
        else:
            sink = _ControlSink(sink_path, self.limits, machine_id, self.floods)
            sink.on_exit = lambda: _acknowledge(sock)
        bucket = _Bucket(self.limits.rate_bytes, self.limits.burst_bytes, self._clock())
        channel = _Channel(machine_id, kind, sock, sink, bucket)
        with self._lock:
            previous = self._channels.pop((machine_id, kind), None)
            self._channels[(machine_id, kind)] = channel
            if previous is not None:
                self._close(previous)
            self._selector.register(sock, selectors.EVENT_READ, channel)
            self._start()
        self._wake()

    def attached(self, machine_id: str, kind: str) -> bool:
        with self._lock:
            channel = self._channels.get((machine_id, kind))
            return channel is not None and not channel.done.is_set()

    def detach(self, machine_id: str) -> None:
        with self._lock:
            for kind in ("console", "control"):
                channel = self._channels.pop((machine_id, kind), None)
                if channel is not None:
                    self._close(channel)
        self._wake()

    def wait_done(self, machine_id: str, kind: str, timeout_s: float) -> bool:
        """Block until the channel reached its end (the VMM exited) and what it sent is in
        its file; True if it did (or was never attached)."""
        with self._lock:
            channel = self._channels.get((machine_id, kind))
        return channel is None or channel.done.wait(timeout_s)

    def close(self) -> None:
        with self._lock:
            for channel in list(self._channels.values()):
                self._close(channel)
            self._channels.clear()
        self._wake()

    # the thread
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="guest-channels", daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _close(self, channel: _Channel) -> None:
        """With the lock held."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(channel.sock)
        channel.sock.close()
        if isinstance(channel.sink, _ControlSink):
            channel.sink.finish()
        channel.sink.close()
        channel.done.set()

    def _run(self) -> None:
        while True:
            timeout = self._throttle_timeout()
            events = self._selector.select(timeout)
            for key, _mask in events:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                    continue
                self._read(key.data)
            self._unthrottle()

    def _throttle_timeout(self) -> float | None:
        with self._lock:
            waits = [c.throttled_until for c in self._channels.values() if c.throttled_until]
        if not waits:
            return None
        return max(0.0, min(waits) - self._clock())

    def _unthrottle(self) -> None:
        now = self._clock()
        with self._lock:
            for channel in self._channels.values():
                if channel.throttled_until and channel.throttled_until <= now:
                    channel.throttled_until = 0.0
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._selector.register(channel.sock, selectors.EVENT_READ, channel)

    def _read(self, channel: _Channel) -> None:
        now = self._clock()
        allowance = channel.bucket.available(now)
        if allowance < 1:
            self._throttle(channel, now)
            return
        try:
            data = channel.sock.recv(min(READ_CHUNK, allowance))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            if error.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                log.warning("machine %s %s channel: %s", channel.machine_id, channel.kind, error)
            data = b""
        if not data:
            with self._lock:
                if self._channels.get((channel.machine_id, channel.kind)) is channel:
                    del self._channels[(channel.machine_id, channel.kind)]
                self._close(channel)
            return
        channel.bucket.spend(len(data))
        self.bytes_read += len(data)
        try:
            channel.sink.write(data)
        except OSError as error:
            log.warning("machine %s %s log: %s", channel.machine_id, channel.kind, error)
        if channel.bucket.tokens < 1:
            self._throttle(channel, now)

    def _throttle(self, channel: _Channel, now: float) -> None:
        channel.throttled_until = now + channel.bucket.wait_s()
        with self._lock, contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(channel.sock)


def _acknowledge(sock: socket.socket) -> None:
    """Tell the guest its exit was taken (a few bytes on a socket nobody else writes)."""
    with contextlib.suppress(OSError):
        sock.send(EXIT_ACK_REPLY)


CONNECT_TIMEOUT_S = 2.0


def connect_unix(path: Path, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connection to a channel QEMU serves; a QEMU that does not take it within
    ``timeout_s`` (its backlog full, the process stopped) raises ``OSError``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock
