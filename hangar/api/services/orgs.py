"""Orgs: create, list, read (with quotas and usage), set quotas."""

from __future__ import annotations

from hangar.api.access import Access, org_not_found
from hangar.api.schemas import (
    CreateOrgRequest,
    OrgDetail,
    OrgList,
    OrgUsageView,
    QuotasRequest,
    iso8601,
)
from hangar.api.services.platform import RoomOf
from hangar.api.services.quotas import QuotaService
from hangar.clock import Clock
from hangar.store.protocol import Org, OrgQuotas, TenancyStore

DEFAULT_ORG = "personal"


class OrgService:
    def __init__(
        self,
        store: TenancyStore,
        quotas: QuotaService,
        clock: Clock,
        default_quotas: OrgQuotas | None = None,
    ) -> None:
        """``default_quotas``: what a new org gets until the operator changes it."""
        self._store = store
        self._quotas = quotas
        self._clock = clock
        self.default_quotas = default_quotas or OrgQuotas()

    def require(self, access: Access, slug: str) -> Org:
        """The org, if it exists and the caller may know of it; else the same 404 either way."""
        access.require_org(slug)
        org = self._store.get_org(slug)
        if org is None:
            raise org_not_found(slug)
        return org

    def view(self, org: Org) -> OrgDetail:
        usage = self._quotas.usage(org.slug)
        return OrgDetail(
            slug=org.slug,
            name=org.name,
            created_at=iso8601(org.created_at),
            quotas=org.quotas,
            usage=OrgUsageView(**usage.model_dump()),
        )

    def create(self, request: CreateOrgRequest) -> OrgDetail:
        org = self._store.create_org(
            request.slug,
            request.name or request.slug,
            self._clock.now(),
            quotas=self.default_quotas,
        )
        return self.view(org)

    def list(self) -> OrgList:
        return OrgList(orgs=[self.view(org) for org in self._store.list_orgs()])

    def get(self, access: Access, slug: str) -> OrgDetail:
        return self.view(self.require(access, slug))

    def room_of(self, access: Access) -> RoomOf | None:
        """For an org's token, how many more machines of a shape its quota allows; None for
        the operator (answered from what the hosts have)."""
        if access.is_operator:
            return None
        org_slug = access.org_slug or ""
        return lambda guest: self._quotas.room(org_slug, guest)

    def set_quotas(self, access: Access, slug: str, request: QuotasRequest) -> OrgDetail:
        self.require(access, slug)
        return self.view(self._store.set_quotas(slug, request.quotas()))
