"""The audit log: every mutating call and operator action, who made it and how it ended.

A record stores at most :data:`MAX_VALUE_CHARS` of any value a request named (a path
parameter may be 60 KB long), and records older than the retention are deleted."""

from __future__ import annotations

import logging

from hangar.api.access import Access
from hangar.api.schemas import AuditList, AuditView, iso8601
from hangar.clock import Clock
from hangar.store.protocol import ApiToken, AuditRecord, TenancyStore

log = logging.getLogger(__name__)

MAX_VALUE_CHARS = 128
MAX_TARGET_CHARS = 512
PRUNE_EVERY = 256
"""Records written between two deletions of expired ones."""
DEFAULT_RETENTION_S = 90 * 86400.0


def clip(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``value``, cut to ``limit`` characters with a marker saying how long it was."""
    if len(value) <= limit:
        return value
    marker = f"...({len(value)} chars)"
    return value[: max(0, limit - len(marker))] + marker


class Outcome:
    OK = "ok"
    DENIED = "denied"
    RATE_LIMITED = "rate_limited"
    REJECTED = "rejected"
    ERROR = "error"

    @staticmethod
    def of_status(status: int) -> str:
        if status >= 500:
            return Outcome.ERROR
        return Outcome.REJECTED if status >= 400 else Outcome.OK


class AuditService:
    def __init__(
        self, store: TenancyStore, clock: Clock, retention_s: float = DEFAULT_RETENTION_S
    ) -> None:
        self._store = store
        self._clock = clock
        self.retention_s = retention_s
        self._since_prune = PRUNE_EVERY

    def prune(self) -> int:
        """Delete the records older than the retention; returns how many."""
        self._since_prune = 0
        try:
            return self._store.prune_audit(self._clock.now() - self.retention_s)
        except Exception:
            log.exception("could not delete expired audit records")
            return 0

    def record(
        self,
        token: ApiToken | None,
        org_slug: str,
        action: str,
        target: dict[str, str],
        status: int,
        outcome: str,
    ) -> None:
        """Append one record; a failure to write is logged, never turned into the response."""
        if self._since_prune >= PRUNE_EVERY:
            self.prune()
        self._since_prune += 1
        record = AuditRecord(
            timestamp=self._clock.now(),
            token_id=clip(token.id) if token is not None else "",
            org_slug=clip(org_slug),
            action=clip(action),
            target=clip(
                " ".join(f"{clip(key)}={clip(value)}" for key, value in sorted(target.items())),
                MAX_TARGET_CHARS,
            ),
            app_name=clip(target.get("app_name", "")),
            machine_id=clip(target.get("machine_id", "")),
            outcome=outcome,
            status=status,
        )
        try:
            self._store.add_audit(record)
        except Exception:
            log.exception("could not write the audit record of %s", record.action)

    def list(
        self, access: Access, org_slug: str | None, limit: int, before: int | None
    ) -> AuditList:
        """The operator reads any org's records (or all); an org token only its own org's."""
        if org_slug is not None:
            access.require_org(org_slug)
        elif not access.is_operator:
            org_slug = access.token.org_slug
        records = self._store.list_audit(org_slug, limit, before)
        return AuditList(
            records=[
                AuditView(time=iso8601(record.timestamp), **record.model_dump())
                for record in records
            ]
        )
