"""The store's invariants, read straight from a server's SQLite file (read-only).

Each check returns the violations it found, as sentences; an empty list means it holds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hangar.model.machine import MachineState
from hangar.model.run import UNFINISHED

LIVE = "state != 'destroyed'"


@contextmanager
def read_only(database: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        yield connection
    finally:
        connection.close()


def unfinished_runs(database: Path) -> int:
    with read_only(database) as db:
        placeholders = ",".join("?" * len(UNFINISHED))
        sql = f"SELECT count(*) FROM agent_runs WHERE status IN ({placeholders})"
        return int(db.execute(sql, sorted(UNFINISHED)).fetchone()[0])


def machine_violations(db: sqlite3.Connection, machines_dir: Path) -> list[str]:
    """Every machine in exactly one known state, in an app of an org; side records match."""
    found = []
    states = {str(state) for state in MachineState}
    for machine_id, state in db.execute("SELECT id, state FROM machines"):
        if state not in states:
            found.append(f"machine {machine_id} is in unknown state {state!r}")
    duplicates = db.execute(
        f"SELECT app, name, count(*) FROM machines WHERE {LIVE}"
        " GROUP BY app, name HAVING count(*) > 1"
    ).fetchall()
    found += [f"{count} live machines named {name} in app {app}" for app, name, count in duplicates]
    orphans = db.execute(
        "SELECT m.id, m.app FROM machines m LEFT JOIN apps a ON a.name = m.app"
        f" WHERE a.name IS NULL AND m.{LIVE}"
    ).fetchall()
    found += [f"live machine {machine_id} has no app {app}" for machine_id, app in orphans]
    homeless = db.execute(
        "SELECT a.name, a.org_slug FROM apps a LEFT JOIN orgs o ON o.slug = a.org_slug"
        " WHERE o.slug IS NULL"
    ).fetchall()
    found += [f"app {app} belongs to no org ({org})" for app, org in homeless]
    for (machine_id,) in db.execute("SELECT id FROM machines WHERE state = 'destroyed'"):
        if (machines_dir / machine_id).exists():
            found.append(f"destroyed machine {machine_id} still has a run directory")
    return found


def claim_violations(db: sqlite3.Connection) -> list[str]:
    """No lease, VM handle, host claim or unfinished run without a live machine."""
    found = []
    for table in ("leases", "vm_handles"):
        rows = db.execute(
            f"SELECT t.machine_id FROM {table} t LEFT JOIN machines m ON m.id = t.machine_id"
            " WHERE m.id IS NULL OR m.state = 'destroyed'"
        ).fetchall()
        found += [f"{table} row for machine {row[0]}, which is not live" for row in rows]
    states = dict(db.execute("SELECT id, state FROM machines"))
    for host_id, body in db.execute("SELECT host_id, body FROM host_states"):
        for machine_id, *_rest in json.loads(body)["claims"]:
            if states.get(machine_id, "destroyed") == "destroyed":
                found.append(f"host {host_id} has a claim of {machine_id}, which is not live")
    runs = db.execute(
        "SELECT r.id, r.machine_id FROM agent_runs r LEFT JOIN machines m"
        " ON m.id = r.machine_id WHERE m.id IS NULL AND r.machine_id NOT LIKE 'gpu:%'"
        " AND r.machine_id NOT LIKE 'vol:%'"
    ).fetchall()
    found += [f"run {run} of unknown machine {machine}" for run, machine in runs]
    volume_runs = db.execute(
        "SELECT r.id, r.machine_id FROM agent_runs r LEFT JOIN volumes v"
        " ON 'vol:' || v.id = r.machine_id WHERE r.machine_id LIKE 'vol:%' AND v.id IS NULL"
    ).fetchall()
    found += [f"run {run} of unknown volume {volume}" for run, volume in volume_runs]
    placeholders = ",".join("?" * len(UNFINISHED))
    running = db.execute(
        f"SELECT id, machine_id FROM agent_runs WHERE status IN ({placeholders})",
        sorted(UNFINISHED),
    ).fetchall()
    found += [f"run {run} of {machine} never finished" for run, machine in running]
    return found


def org_violations(db: sqlite3.Connection) -> list[str]:
    """Every event belongs to a machine of an app of an org; every audit record that acted
    on a machine is in that machine's org, and was made by a token of that org (or the
    operator)."""
    found = []
    stray_events = db.execute(
        "SELECT e.id, e.machine_id FROM events e"
        " LEFT JOIN machines m ON m.id = e.machine_id"
        " LEFT JOIN apps a ON a.name = m.app"
        " LEFT JOIN orgs o ON o.slug = a.org_slug"
        " WHERE m.id IS NULL OR (o.slug IS NULL AND m.state != 'destroyed')"
    ).fetchall()
    found += [f"event {event} of {machine} belongs to no org" for event, machine in stray_events]
    token_orgs = {
        token_id: org for token_id, org in db.execute("SELECT id, org_slug FROM api_tokens")
    }
    machine_orgs = dict(
        db.execute("SELECT m.id, a.org_slug FROM machines m JOIN apps a ON a.name = m.app")
    )
    for (body,) in db.execute("SELECT body FROM audit_log"):
        record = json.loads(body)
        machine_org = machine_orgs.get(record["machine_id"])
        if record["outcome"] == "ok" and record["machine_id"] and machine_org is None:
            found.append(f"audit record {record} names an unknown machine")
        if record["outcome"] == "ok" and machine_org and record["org_slug"] != machine_org:
            found.append(f"audit record {record} is not in its machine's org {machine_org}")
        token_org = token_orgs.get(record["token_id"])
        if token_org and record["org_slug"] not in (token_org, ""):
            found.append(f"audit record {record} is outside its token's org {token_org}")
    return found


def volume_violations(db: sqlite3.Connection) -> list[str]:
    """Every live volume is in an app; one attached is attached to a machine of its app that
    holds resources (a machine lets go of its volumes when it stops)."""
    found = []
    holding = {str(state) for state in MachineState if state.holds_resources}
    machines = {
        machine_id: (app, state)
        for machine_id, app, state in db.execute("SELECT id, app, state FROM machines")
    }
    apps = {name for (name,) in db.execute("SELECT name FROM apps")}
    for (body,) in db.execute(f"SELECT body FROM volumes WHERE {LIVE}"):
        volume = json.loads(body)
        if volume["app"] not in apps:
            found.append(f"volume {volume['id']} has no app {volume['app']}")
        holder = volume["attached_machine_id"]
        if holder is None:
            continue
        app, state = machines.get(holder, ("", "destroyed"))
        if app != volume["app"] or state not in holding:
            found.append(f"volume {volume['id']} is attached to {holder}, which is {state}")
    return found


def store_violations(database: Path, machines_dir: Path) -> list[str]:
    with read_only(database) as db:
        return (
            machine_violations(db, machines_dir)
            + claim_violations(db)
            + org_violations(db)
            + volume_violations(db)
        )
