"""One QMP command per connection, bounded by an injected clock.

QEMU serves one QMP client at a time on a monitor socket (others wait in the backlog),
so each call connects, runs its command and disconnects at once.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from hangar.clock import Clock
from hangar.vmm.deadline import run_with_deadline
from hangar.vmm.errors import QmpError

log = logging.getLogger(__name__)


async def qmp_execute(
    socket_path: Path,
    command: str,
    arguments: dict[str, Any] | None = None,
    *,
    clock: Clock,
    timeout_s: float,
) -> object:
    """Run ``command`` on the monitor at ``socket_path`` and return its ``return`` value."""
    client = QMPClient("hangar")

    async def session() -> object:
        try:
            await client.connect(str(socket_path))
        except AssertionError:
            # qemu.qmp asserts the session is still up once it is set up: QEMU closing the
            # socket just then (it is exiting, e.g. on a snapshot it cannot load) is a lost
            # connection, not a bug of ours.
            raise EOFError(f"QEMU closed {socket_path} as the session began") from None
        try:
            return await client.execute(command, arguments)
        finally:
            await _disconnect(client)

    try:
        return await run_with_deadline(clock, timeout_s, session())
    except (QMPError, OSError, EOFError, TimeoutError) as error:
        await _disconnect(client)
        raise QmpError(
            f"QMP {command} on {socket_path} failed: {error or type(error).__name__}",
            socket=str(socket_path),
            command=command,
            retryable=isinstance(error, TimeoutError | OSError | EOFError),
        ) from error


async def _disconnect(client: QMPClient) -> None:
    # After ``quit`` QEMU closes the socket itself; a failing disconnect says nothing new.
    with contextlib.suppress(QMPError, OSError, EOFError):
        await client.disconnect()


async def query_status(socket_path: Path, *, clock: Clock, timeout_s: float) -> str:
    """The VM's run state as QEMU reports it (``running``, ``paused``, ``guest-panicked``...)."""
    reply = await qmp_execute(socket_path, "query-status", clock=clock, timeout_s=timeout_s)
    status = reply.get("status") if isinstance(reply, dict) else None
    if not isinstance(status, str):
        raise QmpError(
            f"QMP query-status on {socket_path} gave {reply!r}",
            socket=str(socket_path),
            command="query-status",
        )
    return status
