"""The audit log: every mutating call and operator action, who made it and how it ended."""

from __future__ import annotations

import logging

from hangar.api.access import Access
from hangar.api.schemas import AuditList, AuditView, iso8601
from hangar.clock import Clock
from hangar.store.protocol import ApiToken, AuditRecord, TenancyStore

log = logging.getLogger(__name__)


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
    def __init__(self, store: TenancyStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

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
        record = AuditRecord(
            timestamp=self._clock.now(),
            token_id=token.id if token is not None else "",
            org_slug=org_slug,
            action=action,
            target=" ".join(f"{key}={value}" for key, value in sorted(target.items())),
            app_name=target.get("app_name", ""),
            machine_id=target.get("machine_id", ""),
            outcome=outcome,
            status=status,
        )
        try:
            self._store.add_audit(record)
        except Exception:
            log.exception("could not write the audit record %s", record.model_dump_json())

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
