"""What a machine create, get, start, stop or an agent notice reads does not grow with the
fleet: every SQL statement they run is traced; SQLite's own query plan of each must find its
rows by key or index, never by scanning a table that grows with the machines; and with ten
times the machines they run as many statements, each returning as many rows.

The services are called directly on the server's event loop, each call synchronous from end
to end, so the statements traced are that call's alone (the agent's own loop cannot run in
between)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx

from hangar.api.deps import Services
from hangar.api.schemas import CreateMachineRequest, StopRequest
from hangar.model.config import MachineConfig
from hangar.model.machine import MachineState
from hangar.settings import DATABASE
from tests.api.helpers import wait_runs_finished
from tests.api.test_quotas import create, quota_org
from tests.fixtures.inprocess import InProcessServer

FLEET_TABLES = frozenset(
    {
        "machines",
        "machine_versions",
        "events",
        "leases",
        "org_usage",
        "agent_runs",
        "vm_handles",
        "volumes",
        "usage_intervals",
    }
)
"""Tables whose rows grow with the machines (the scheduler's host records are one per host)."""
SKIPPED = ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "SAVEPOINT", "RELEASE")


class StatementTrace:
    """Every statement of the server's store connections while ``recording``."""

    def __init__(self, server: InProcessServer) -> None:
        self.statements: list[str] = []
        self._recording = False
        self._connections: list[sqlite3.Connection] = [
            store._db for store in vars(server.embedded.stores).values()
        ]
        for connection in self._connections:
            connection.set_trace_callback(self._record)

    def _record(self, statement: str) -> None:
        if self._recording and not statement.lstrip().upper().startswith(SKIPPED):
            self.statements.append(statement)

    def close(self) -> None:
        for connection in self._connections:
            connection.set_trace_callback(None)

    def run(self, server: InProcessServer, call: Callable[[], Any]) -> list[tuple[str, int]]:
        """The statements ``call`` runs, called on the server's loop without yielding, each
        with the rows it returns (a query read again at once; -1 for a write)."""

        async def traced() -> list[tuple[str, int]]:
            self.statements = []
            self._recording = True
            try:
                call()
            finally:
                self._recording = False
            with sqlite3.connect(server.home / DATABASE) as db:
                return [
                    (sql, len(db.execute(sql).fetchall()) if _reads(sql) else -1)
                    for sql in self.statements
                ]

        return server.call(traced())


def _reads(statement: str) -> bool:
    return statement.lstrip().upper().startswith(("SELECT", "WITH"))


@contextmanager
def traced(server: InProcessServer) -> Iterator[StatementTrace]:
    trace = StatementTrace(server)
    try:
        yield trace
    finally:
        trace.close()


def scans(server: InProcessServer, statements: list[str]) -> list[str]:
    """The statements whose plan scans a fleet-sized table, with the plan's line."""
    found = []
    with sqlite3.connect(server.home / DATABASE) as db:
        for statement in statements:
            for row in db.execute(f"EXPLAIN QUERY PLAN {statement}"):
                detail = str(row[-1])
                words = detail.split()
                if words[:1] == ["SCAN"] and len(words) > 1 and words[1] in FLEET_TABLES:
                    found.append(f"{detail}: {statement}")
    return found


def one_round(
    api: httpx.Client, server: InProcessServer, trace: StatementTrace, app: str, image: str
) -> dict[str, list[tuple[str, int]]]:
    """Each operation once, on a machine it creates: the statements each ran."""
    services: Services = server.embedded.app.state.services
    machines = server.embedded.stores.machines
    request = CreateMachineRequest(config=MachineConfig(image=image), skip_launch=True)
    created: list[str] = []
    statements = {
        "create": trace.run(
            server,
            lambda: created.append(services.machines.create(app, request, actor="test").id),
        )
    }
    machine_id = created[0]
    statements["get"] = trace.run(
        server, lambda: services.machines.view(services.machines.require(app, machine_id))
    )
    statements["notice"] = trace.run(server, partial(server.embedded.agent.notify, machine_id))
    # Stop needs a running machine and start a stopped one: the record says so, and the
    # runs they submit find no VM to stop and, its image gone, none to start.
    wait_runs_finished(api, app, machine_id)
    machines.set_state(machine_id, MachineState.STARTED, 1.0)
    statements["stop"] = trace.run(
        server, partial(services.machines.stop, app, machine_id, StopRequest(), None)
    )
    wait_runs_finished(api, app, machine_id)
    machines.set_state(machine_id, MachineState.STOPPED, 1.0)
    missing = MachineConfig(image=f"oci:{server.home}/no-such-layout:latest")
    machines.apply_config_version(machine_id, missing, 2, "i2", 2.0)
    statements["start"] = trace.run(server, partial(services.machines.start, app, machine_id, None))
    wait_runs_finished(api, app, machine_id)
    return statements


def test_create_get_start_stop_and_notices_read_no_table_whole(
    api: httpx.Client, api_server: InProcessServer, test_image: str
) -> None:
    _org, app = quota_org(api, machines=1000, memory_mb=1024 * 1024)
    for _ in range(3):
        assert create(api, app, test_image).status_code == 200
    rows: dict[str, list[list[int]]] = {}
    """operation -> in each round, the rows each of its statements returned"""
    with traced(api_server) as trace:
        for round_ in range(2):
            for operation, statements in one_round(api, api_server, trace, app, test_image).items():
                assert statements, f"{operation} ran no statement: the trace saw nothing"
                assert scans(api_server, [sql for sql, _ in statements]) == [], operation
                rows.setdefault(operation, []).append([count for _, count in statements])
            if round_ == 0:  # ten times the machines, then the same again
                for _ in range(30):
                    assert create(api, app, test_image).status_code == 200
    # As many statements, each returning as many rows, with ten times the machines.
    assert all(first == second for first, second in rows.values()), rows
