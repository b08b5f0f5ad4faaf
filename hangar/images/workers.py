"""The threads image work runs on: a pool of its own, fair between orgs.

Pulls, unpacks and filesystem builds block for seconds to minutes, on registries tenants
choose. They never run on asyncio's default executor (which the rest of the server shares):
they run here, on ``threads`` threads, and one owner (an org) has at most ``per_owner`` of
them at a time; waiting jobs are served round-robin between owners. So one org's slow
registry stalls that org's pulls, never another org's starts.

A job is cancelled when whoever awaits it is (a machine force-destroyed while its image is
pulled): a queued job is dropped, a running one is told through its
:class:`~hangar.images.runner.Cancellation` (its command is killed, its download stopped).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hangar.images.runner import Cancellation, cancellable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    owner: str
    work: Callable[[Cancellation], T]
    future: concurrent.futures.Future[T] = field(default_factory=concurrent.futures.Future)
    cancellation: Cancellation = field(default_factory=Cancellation)


class ImageWorkers:
    def __init__(self, threads: int = 4, per_owner: int = 2, name: str = "image") -> None:
        if threads < 1 or per_owner < 1:
            raise ValueError("an image pool needs at least one thread, and one per owner")
        self.threads = threads
        self.per_owner = min(per_owner, threads)
        self._name = name
        self._lock = threading.Condition()
        self._queues: OrderedDict[str, deque[_Job[Any]]] = OrderedDict()
        self._running: dict[str, int] = {}
        self._workers: list[threading.Thread] = []
        self._closed = False

    # what tests and the dashboard look at
    def running(self) -> dict[str, int]:
        with self._lock:
            return {owner: n for owner, n in self._running.items() if n}

    def queued(self) -> dict[str, int]:
        with self._lock:
            return {owner: len(jobs) for owner, jobs in self._queues.items() if jobs}

    async def run(self, owner: str, work: Callable[[Cancellation], T]) -> T:
        """Run ``work(cancellation)`` on a pool thread when ``owner``'s turn comes."""
        job: _Job[T] = _Job(owner, work)
        self._submit(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self._cancel(job, "the operation waiting for it was cancelled")
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for jobs in self._queues.values():
                for job in jobs:
                    job.future.cancel()
                jobs.clear()
            self._lock.notify_all()

    def _submit(self, job: _Job[Any]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the image pool is closed")
            self._queues.setdefault(job.owner, deque()).append(job)
            if len(self._workers) < self.threads:
                worker = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
            self._lock.notify()

    def _cancel(self, job: _Job[Any], reason: str) -> None:
        with self._lock:
            queue = self._queues.get(job.owner)
            if queue is not None and job in queue:
                queue.remove(job)
                job.future.cancel()
                return
        job.cancellation.cancel(reason)

    def _next(self) -> _Job[Any] | None:
        """The next job, round-robin over owners under their share; None if none may run."""
        for owner in list(self._queues):
            jobs = self._queues[owner]
            if jobs and self._running.get(owner, 0) < self.per_owner:
                job = jobs.popleft()
                self._queues.move_to_end(owner)  # the others go first next time
                if not jobs:
                    del self._queues[owner]
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._lock:
                job = self._next()
                while job is None:
                    if self._closed:
                        return
                    self._lock.wait()
                    job = self._next()
                self._running[job.owner] = self._running.get(job.owner, 0) + 1
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        with cancellable(job.cancellation):
                            result = job.work(job.cancellation)
                    except BaseException as error:  # handed to the awaiting task
                        job.future.set_exception(error)
                    else:
                        job.future.set_result(result)
            finally:
                with self._lock:
                    self._running[job.owner] -= 1
                    if not self._running[job.owner]:
                        del self._running[job.owner]
                    self._lock.notify_all()
