"""What the fleet's etcd stores share: reading records back from transaction answers, and the
bound on compare-and-set rounds.

Every change to a shared record is one etcd transaction that compares the ``mod_revision`` it
read (or that a key is absent) and writes everything the change touches at once (the record,
its name index, its config version...), so a concurrent writer on another API replica or agent
makes one of the two retry on fresh data and nothing is ever half written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hangar.errors import Conflict
from hangar.store.etcd.client import KeyValue, OpResult, RangeResult, TxnResult

T = TypeVar("T")

MAX_CAS_ROUNDS = 64
"""Rounds of read, change, compare-and-set before a write gives up (retryable) under
contention; each lost round means another writer committed, so the fleet made progress."""


def answer_kv(result: TxnResult, index: int) -> KeyValue | None:
    """The key read by the ``index``-th operation of the branch a transaction took."""
    answer: OpResult = result.responses[index]
    if isinstance(answer, RangeResult) and answer.kvs:
        return answer.kvs[0]
    return None


def with_retries(what: str, attempt: Callable[[], T | None]) -> T:
    """Call ``attempt`` until it returns something (None: lost a race, read again)."""
    for _ in range(MAX_CAS_ROUNDS):
        outcome = attempt()
        if outcome is not None:
            return outcome
    raise Conflict(f"{what}: too many concurrent writers, try again", retryable=True)
