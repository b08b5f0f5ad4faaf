"""The SQLite machine store's usage counters: counted once for a database made before them,
and equal to a full recount after the writing process is killed at any moment (they change
in the same transaction as the machine)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from hangar.model.footprint import Footprint
from hangar.model.machine import MachineState
from hangar.store.machines import SqliteMachineStore
from tests.store.test_contracts import recount, sized

WRITER = """
import sys
from pathlib import Path
from hangar.model.machine import MachineState
from hangar.store.machines import SqliteMachineStore
from tests.store.test_contracts import sized

store = SqliteMachineStore(Path(sys.argv[1]))
store.create_app("web", "acme", 1.0)
for n in range(100_000):
    store.insert_machine(sized(f"m{n}", "web", 128 * (1 + n % 4), gpus=n % 2))
    if n % 3 == 0:
        store.apply_config_version(f"m{n}", sized("x", "web", 1024).config, 2, "i2", 2.0)
    if n % 5 == 0:
        store.set_state(f"m{n}", MachineState.DESTROYED, 3.0)
"""
KILL_AFTER_MACHINES = 300
DEADLINE_S = 60.0


def test_a_database_from_before_the_counters_is_counted_when_opened(tmp_path: Path) -> None:
    database = tmp_path / "db"
    store = SqliteMachineStore(database)
    store.create_app("web", "acme", 1.0)
    for n in range(5):
        store.insert_machine(sized(f"m{n}", "web", 256 * (n + 1), gpus=n % 2))
    store.set_state("m0", MachineState.DESTROYED, 2.0)
    store.close()
    with sqlite3.connect(database) as db:  # as an older hangar left it
        db.execute("DROP TABLE org_usage")
        db.execute("DROP TABLE org_usage_counted")

    reopened = SqliteMachineStore(database)

    assert reopened.machine_usage("acme") == Footprint(
        machines=4, memory_mb=256 * (2 + 3 + 4 + 5), gpus={"l40s": 2}
    )
    assert reopened.machine_usage("acme") == recount(reopened, "acme")
    reopened.close()


def _machines_in(database: Path) -> int:
    try:
        with sqlite3.connect(database, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM machines").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not made yet


def test_counters_match_a_recount_after_the_writer_is_killed(tmp_path: Path) -> None:
    database = tmp_path / "db"
    root = Path(__file__).resolve().parents[2]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(database)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while _machines_in(database) < KILL_AFTER_MACHINES:
            assert writer.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "the writer wrote too slowly"
            time.sleep(0.01)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()

    store = SqliteMachineStore(database)
    counted = store.machine_usage("acme")
    assert counted.machines >= KILL_AFTER_MACHINES * 3 // 4
    assert counted == recount(store, "acme")
    store.close()
