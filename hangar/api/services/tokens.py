"""API tokens: random secrets shown once, stored only as a hash, checked on every request."""

from __future__ import annotations

import hashlib
import secrets

from hangar.api.schemas import CreateTokenRequest, TokenCreated, TokenList, TokenView, iso8601
from hangar.clock import Clock
from hangar.errors import NotFound, Unauthenticated
from hangar.store.protocol import ApiToken, MachineStore, TenancyStore, TokenKind

SECRET_PREFIX = "hgr_"


def hash_secret(secret: str) -> str:
    """Tokens are 256 random bits, so one SHA-256 is enough: there is nothing to brute-force."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_status(token: ApiToken, now: float) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


class TokenService:
    def __init__(self, store: TenancyStore, cluster: MachineStore, clock: Clock) -> None:
        self._store = store
        self._cluster = cluster
        self._clock = clock

    def authenticate(self, secret: str) -> ApiToken:
        token = self._store.token_by_hash(hash_secret(secret))
        if token is None:
            raise Unauthenticated("token is not valid")
        status = token_status(token, self._clock.now())
        if status != "active":
            raise Unauthenticated(f"token {token.id} is {status}", token_id=token.id)
        return token

    def _issue(self, token: ApiToken) -> tuple[ApiToken, str]:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        self._store.insert_token(token, hash_secret(secret))
        return token, secret

    def issue(
        self,
        org_slug: str,
        app_name: str | None = None,
        read_only: bool = False,
        ttl_s: int | None = None,
        description: str = "",
    ) -> tuple[ApiToken, str]:
        """An org token, or with ``app_name`` an app token; returns it and its secret."""
        if self._store.get_org(org_slug) is None:
            raise NotFound(f"org {org_slug} not found", field="org_slug")
        if app_name is not None:
            app = self._cluster.get_app(app_name)
            if app is None or app.org_slug != org_slug:
                raise NotFound(f"app {app_name} not found in org {org_slug}", field="app_name")
        now = self._clock.now()
        return self._issue(
            ApiToken(
                id=new_token_id(),
                kind=TokenKind.ORG,
                org_slug=org_slug,
                app_name=app_name,
                read_only=read_only,
                description=description,
                created_at=now,
                expires_at=None if ttl_s is None else now + ttl_s,
            )
        )

    def issue_operator(self, description: str) -> tuple[ApiToken, str]:
        return self._issue(
            ApiToken(
                id=new_token_id(),
                kind=TokenKind.OPERATOR,
                description=description,
                created_at=self._clock.now(),
            )
        )

    def active_operator_tokens(self) -> list[ApiToken]:
        now = self._clock.now()
        return [
            token
            for token in self._store.list_tokens()
            if token.kind == TokenKind.OPERATOR and token_status(token, now) == "active"
        ]

    def revoke(self, token_id: str) -> ApiToken:
        return self._store.revoke_token(token_id, self._clock.now())

    # the API's views
    def view(self, token: ApiToken) -> TokenView:
        def time(timestamp: float | None) -> str | None:
            return None if timestamp is None else iso8601(timestamp)

        return TokenView(
            **token.model_dump(exclude={"created_at", "expires_at", "revoked_at"}),
            status=token_status(token, self._clock.now()),
            created_at=iso8601(token.created_at),
            expires_at=time(token.expires_at),
            revoked_at=time(token.revoked_at),
        )

    def create(self, request: CreateTokenRequest) -> TokenCreated:
        token, secret = self.issue(
            request.org_slug,
            request.app_name,
            request.read_only,
            None if request.expires_in is None else round(request.expires_in),
            request.description,
        )
        return TokenCreated(**self.view(token).model_dump(), token=secret)

    def list_view(self, org_slug: str | None) -> TokenList:
        return TokenList(tokens=[self.view(token) for token in self._store.list_tokens(org_slug)])


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(8)
