"""The dashboard's live event stream (server-sent events): machine events of the machines the
viewer may see, as they are recorded.

Bounded: at most ``MAX_STREAMS`` streams at once (a 429 past that), each ends after
``STREAM_S`` (the browser's EventSource reconnects by itself), the token is checked again on
every pass (a revoked token's stream ends), and each pass reads at most the events of the
viewer's ``MAX_MACHINES`` most recently changed machines.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from hangar.clock import Clock
from hangar.errors import HangarError, RateLimited
from hangar.model.machine import Machine
from hangar.store.protocol import MachineStore
from hangar.web.pages import DashboardReader
from hangar.web.viewer import Viewer

MAX_STREAMS = 16
STREAM_S = 600.0
WAKE_S = 2.0
HEARTBEAT_S = 15.0
EVENTS_PER_MACHINE = 20
RETRY_MS = 2000

Changes = Callable[[float], Awaitable[None]]
"""Waits until something changes (the agent's ``wait_for_change``) or the timeout passes."""


@dataclass(frozen=True)
class Cursor:
    """Events after (timestamp, id) are new; event ids are ULIDs, ordered by time."""

    timestamp: int
    event_id: str

    def before(self, timestamp: int, event_id: str) -> bool:
        return (self.timestamp, self.event_id) < (timestamp, event_id)


def sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStreams:
    def __init__(
        self, machines: MachineStore, reader: DashboardReader, changes: Changes, clock: Clock
    ) -> None:
        self._machines = machines
        self._reader = reader
        self._changes = changes
        self._clock = clock
        self.active = 0

    def admit(self) -> None:
        """Refuse a new stream while ``MAX_STREAMS`` run (a stream counts once it starts)."""
        if self.active >= MAX_STREAMS:
            raise RateLimited(
                f"too many live event streams (at most {MAX_STREAMS}); try again shortly",
                retry_after_s=5,
            )

    def new_events(self, machines: list[Machine], cursor: Cursor) -> list[dict[str, object]]:
        found: list[tuple[int, str, dict[str, object]]] = []
        for machine in machines:
            for event in self._machines.list_events(machine.id, EVENTS_PER_MACHINE):
                if cursor.before(event.timestamp, event.id):
                    found.append(
                        (
                            event.timestamp,
                            event.id,
                            {
                                "id": event.id,
                                "machine_id": machine.id,
                                "machine_name": machine.name,
                                "app": machine.app,
                                "type": event.type,
                                "status": event.status,
                                "source": event.source,
                                "timestamp": event.timestamp,
                                "state": str(machine.state),
                            },
                        )
                    )
        found.sort(key=lambda item: (item[0], item[1]))
        return [payload for _timestamp, _id, payload in found]

    async def stream(self, viewer_of: Callable[[], Viewer], since_ms: int) -> AsyncIterator[bytes]:
        """Events after ``since_ms`` until the stream's time is up; ``viewer_of`` is asked
        again on every pass (it raises once the token is no longer valid)."""
        self.active += 1
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            cursor = Cursor(since_ms, "")
            started = self._clock.monotonic()
            last_sent = started
            while self._clock.monotonic() - started < STREAM_S:
                try:
                    viewer = viewer_of()
                except HangarError:
                    yield sse("end", {"reason": "the token is no longer valid"})
                    return
                for item in self.new_events(self._reader.visible_machines(viewer), cursor):
                    cursor = Cursor(int(str(item["timestamp"])), str(item["id"]))
                    last_sent = self._clock.monotonic()
                    yield sse("machine", item)
                if self._clock.monotonic() - last_sent >= HEARTBEAT_S:
                    last_sent = self._clock.monotonic()
                    yield b": heartbeat\n\n"
                await self._changes(WAKE_S)
        finally:
            self.active -= 1
