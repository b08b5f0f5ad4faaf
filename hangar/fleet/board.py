"""What each agent publishes about its machines' runs, for the API replicas to read.

An agent keeps its runs in its own SQLite (the source of truth for its host); after every step
and every run it publishes the machine's latest runs to ``{prefix}/runs/{host_id}/{machine_id}``
(``BoardEntry``: whether one is unfinished, the newest ``RECENT_RUNS``). The replicas answer
``GET .../runs`` and "is this machine busy" from there. Publishing is off the agent's loop, on a
thread of its own, coalescing a burst of steps into one write; while etcd is unavailable the
machines stay marked and are published once it answers again.
"""

from __future__ import annotations

import logging
import threading

from pydantic import BaseModel, Field

from hangar.errors import StoreError
from hangar.model.run import RunRecord, RunStatus
from hangar.store.etcd.client import MAX_TXN_OPS, Delete, EtcdClient, Txn
from hangar.store.etcd.keys import KeyLayout, segment
from hangar.store.protocol import RunStore

log = logging.getLogger(__name__)

RUNS = "runs"
RECENT_RUNS = 20
RETRY_S = 0.5


class BoardEntry(BaseModel):
    unfinished: bool
    runs: list[RunRecord] = Field(default_factory=list)
    """Oldest first, the newest ``RECENT_RUNS``."""


class RunBoard:
    def __init__(self, client: EtcdClient, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._layout = layout or KeyLayout()

    def key(self, host_id: str, machine_id: str) -> str:
        return self._layout.record(RUNS, host_id, machine_id)

    def publish(self, host_id: str, machine_id: str, runs: list[RunRecord]) -> None:
        entry = BoardEntry(
            unfinished=any(run.status is RunStatus.RUNNING for run in runs),
            runs=runs[-RECENT_RUNS:],
        )
        self._client.put(self.key(host_id, machine_id), entry.model_dump_json().encode())

    def forget(self, machine_ids: list[str]) -> None:
        """Drop the entries of these machines, on whichever host."""
        gone = {segment(machine_id) for machine_id in machine_ids}
        keys = [
            kv.key
            for kv in self._client.range_prefix(self._layout.records(RUNS)).kvs
            if kv.key.rsplit("/", 1)[-1] in gone
        ]
        for start in range(0, len(keys), MAX_TXN_OPS):
            page = keys[start : start + MAX_TXN_OPS]
            self._client.txn(Txn(success=tuple(Delete(key) for key in page)))

    def read(self, host_id: str, machine_id: str) -> BoardEntry | None:
        kv = self._client.get(self.key(host_id, machine_id))
        return None if kv is None else BoardEntry.model_validate_json(kv.value)


class BoardPublisher:
    """A ``RunObserver`` of the agent's engine: marks each run's machine, and a thread
    publishes the marked machines' runs from the local run store."""

    def __init__(self, board: RunBoard, runs: RunStore, host_id: str) -> None:
        self._board = board
        self._runs = runs
        self._host_id = host_id
        self._marked: set[str] = set()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="run board", daemon=True)
        self.published = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        self._thread.join(timeout=5.0)

    def mark(self, machine_id: str) -> None:
        with self._wake:
            self._marked.add(machine_id)
            self._wake.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) until every marked machine is published."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._marked, timeout_s)

    # RunObserver
    def step_started(self, run: RunRecord, step: str) -> None:
        self.mark(run.machine_id)

    def step_finished(
        self, run: RunRecord, step: str, ran: bool, seconds: float, error: BaseException | None
    ) -> None:
        self.mark(run.machine_id)

    def step_retried(self, run: RunRecord, step: str, error: BaseException) -> None:
        self.mark(run.machine_id)

    def run_finished(self, run: RunRecord) -> None:
        self.mark(run.machine_id)

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._marked and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                machine_id = next(iter(self._marked))
                self._marked.discard(machine_id)
            try:
                runs = self._runs.list_runs(machine_id)
                self._board.publish(self._host_id, machine_id, runs)
                self.published += 1
            except StoreError as error:
                log.warning("runs of %s not published yet: %s", machine_id, error)
                with self._wake:
                    self._marked.add(machine_id)
                    self._wake.wait(RETRY_S)
            with self._wake:
                self._wake.notify_all()
