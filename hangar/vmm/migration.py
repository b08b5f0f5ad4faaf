"""QEMU's migration over QMP, as suspend and restore use it: saving a paused VM into a file,
and waiting for an incoming one to be loaded.

QEMU 7.2 has no ``file:`` transport, so the stream goes through ``exec:cat``: QEMU starts a
shell that writes (or, on restore, reads) the file.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from hangar.clock import Clock
from hangar.vmm.qmp import qmp_execute, query_status

POLL_S = 0.01
# query-migrate "status" values in which a migration is still going on.
ACTIVE_STATES = frozenset(
    {
        "setup",
        "active",
        "cancelling",
        "pre-switchover",
        "device",
        "wait-unplug",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "colo",
    }
)
INCOMING_STATE = "inmigrate"
# Run states a VM can be continued from after hangar stopped it or loaded it.
PAUSED_STATES = frozenset({"paused", "postmigrate", "prelaunch", "finish-migrate"})


class MigrationFailed(Exception):
    """QEMU gave up the migration (``query-migrate`` said so); the VM is still there."""


async def query_migrate(socket: Path, *, clock: Clock, timeout_s: float) -> dict[str, Any]:
    reply = await qmp_execute(socket, "query-migrate", clock=clock, timeout_s=timeout_s)
    return reply if isinstance(reply, dict) else {}


async def cancel_active_migration(
    socket: Path, *, clock: Clock, qmp_timeout_s: float, deadline: float
) -> None:
    """Cancel a migration a previous, cut-short suspend left running; wait until it ends."""
    status = (await query_migrate(socket, clock=clock, timeout_s=qmp_timeout_s)).get("status")
    if status not in ACTIVE_STATES:
        return
    await qmp_execute(socket, "migrate_cancel", clock=clock, timeout_s=qmp_timeout_s)
    while status in ACTIVE_STATES:
        if clock.monotonic() >= deadline:
            raise TimeoutError("the previous migration did not end after migrate_cancel")
        await clock.sleep(POLL_S)
        reply = await query_migrate(socket, clock=clock, timeout_s=qmp_timeout_s)
        status = reply.get("status")


async def save_to_file(
    socket: Path,
    partial: Path,
    *,
    clock: Clock,
    qmp_timeout_s: float,
    deadline: float,
    max_bandwidth: int,
) -> None:
    """Stop the vCPUs and stream the VM's state into ``partial``; return once QEMU reports
    the migration completed. Raises :class:`MigrationFailed`, ``TimeoutError`` (at
    ``deadline``, the migration still going on) or :class:`hangar.vmm.errors.QmpError`."""
    await qmp_execute(socket, "stop", clock=clock, timeout_s=qmp_timeout_s)
    await cancel_active_migration(
        socket, clock=clock, qmp_timeout_s=qmp_timeout_s, deadline=deadline
    )
    await qmp_execute(
        socket,
        "migrate-set-parameters",
        {"max-bandwidth": max_bandwidth},
        clock=clock,
        timeout_s=qmp_timeout_s,
    )
    await qmp_execute(
        socket,
        "migrate",
        {"uri": f"exec:cat > {shlex.quote(str(partial))}"},
        clock=clock,
        timeout_s=qmp_timeout_s,
    )
    while True:
        reply = await query_migrate(socket, clock=clock, timeout_s=qmp_timeout_s)
        status = reply.get("status")
        if status == "completed":
            return
        if status not in ACTIVE_STATES:
            raise MigrationFailed(str(reply.get("error-desc") or f"migration {status}"))
        if clock.monotonic() >= deadline:
            raise TimeoutError("the migration did not complete in time")
        await clock.sleep(POLL_S)


async def wait_incoming_loaded(
    socket: Path, *, clock: Clock, qmp_timeout_s: float, deadline: float
) -> str:
    """The run state once QEMU has loaded its incoming migration (it is no longer
    ``inmigrate``). ``TimeoutError`` at ``deadline``."""
    while True:
        state = await query_status(socket, clock=clock, timeout_s=qmp_timeout_s)
        if state != INCOMING_STATE:
            return state
        if clock.monotonic() >= deadline:
            raise TimeoutError("the snapshot was not loaded in time")
        await clock.sleep(POLL_S)
