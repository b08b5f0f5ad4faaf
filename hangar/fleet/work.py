"""Runs addressed to a host: the API replicas put them in etcd, the host's agent takes them in.

``{prefix}/queue/{host_id}/{machine_id}/{run_id}`` holds a ``RunRecord`` (the operation a request
asked for) until the agent of ``host_id`` has recorded it in its own SQLite run store; then the
agent deletes the key. Recording is idempotent by run id (``RunStore.insert_run``), so an agent
that dies between the two takes the same run in again at its next start and runs it once.

``WorkQueue`` is both sides' view of the keys; ``WorkIntake`` is the agent's watch on its own
prefix, handing each run to the agent on the agent's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from hangar.errors import StoreError
from hangar.model.run import RunRecord
from hangar.store.etcd.cache import CacheChange, PrefixCache
from hangar.store.etcd.client import Compare, Delete, EtcdClient, KeyValue, Put, Range, Txn
from hangar.store.etcd.keys import KeyLayout

log = logging.getLogger(__name__)

WORK = "queue"
INTAKE_RETRY_S = 0.5
ACCEPT_S = 30.0
"""How long the agent's loop may take to record a run handed to it."""


def decode_run(kv: KeyValue) -> RunRecord:
    return RunRecord.model_validate_json(kv.value)


class WorkQueue:
    def __init__(self, client: EtcdClient, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._layout = layout or KeyLayout()

    def host_prefix(self, host_id: str) -> str:
        return self._layout.records(WORK, host_id)

    def key(self, host_id: str, run: RunRecord) -> str:
        return self._layout.record(WORK, host_id, run.machine_id, run.id)

    def submit(self, host_id: str, run: RunRecord) -> bool:
        """Address ``run`` to ``host_id``'s agent; False if a run with its id is waiting."""
        key = self.key(host_id, run)
        result = self._client.txn(
            Txn(
                compare=(Compare.absent(key),),
                success=(Put(key, run.model_dump_json().encode()),),
            )
        )
        return result.succeeded

    def pending(self, host_id: str, machine_id: str) -> bool:
        """A run for ``machine_id`` is waiting for its agent to take it in."""
        prefix = self._layout.records(WORK, host_id, machine_id)
        return bool(self._client.range(Range(prefix, prefix=True, limit=1)).kvs)

    def taken(self, kv: KeyValue) -> None:
        """The agent recorded the run: drop its key (unless it was written again since)."""
        self._client.txn(
            Txn(
                compare=(Compare.mod_revision_is(kv.key, kv.mod_revision),),
                success=(Delete(kv.key),),
            )
        )


class WorkIntake:
    """The agent's side: every run waiting under its host (those there at start included) is
    checked (its machine is recorded on this host), handed to ``accept`` on ``loop`` (which
    records it durably and drives it), then its key is dropped. Runs whose machine is not on
    this host are dropped with a warning."""

    def __init__(
        self,
        client: EtcdClient,
        queue: WorkQueue,
        host_id: str,
        belongs_here: Callable[[RunRecord], bool],
        accept: Callable[[RunRecord], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._queue = queue
        self._host_id = host_id
        self._belongs_here = belongs_here
        self._accept = accept
        self._loop = loop
        self._cache: PrefixCache[RunRecord] = PrefixCache(
            client, queue.host_prefix(host_id), decode_run, on_change=self._changed
        )
        self._waiting: list[KeyValue] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=f"intake {host_id}", daemon=True)
        self.taken_in = 0

    def start(self) -> None:
        self._thread.start()
        self._cache.start()

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        self._cache.close()
        self._thread.join(timeout=5.0)

    def _changed(self, changes: Sequence[CacheChange]) -> None:
        with self._wake:
            self._waiting.extend(change.kv for change in changes if not change.deleted)
            self._wake.notify_all()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    return
                kv = self._waiting.pop(0)
            try:
                self._take(kv)
            except StoreError as error:
                log.warning("work %s not taken in yet (%s); trying again", kv.key, error)
                with self._wake:
                    self._waiting.append(kv)
                    self._wake.wait(INTAKE_RETRY_S)
            except Exception:
                log.exception("work %s could not be taken in; left in etcd", kv.key)

    def _take(self, kv: KeyValue) -> None:
        run = decode_run(kv)
        if self._belongs_here(run):
            # recorded durably (on the agent's loop) before the key goes
            asyncio.run_coroutine_threadsafe(self._submit(run), self._loop).result(ACCEPT_S)
        else:
            log.warning(
                "run %s of %s is not for host %s: dropped", run.id, run.machine_id, self._host_id
            )
        self._queue.taken(kv)
        self.taken_in += 1

    async def _submit(self, run: RunRecord) -> None:
        self._accept(run)
