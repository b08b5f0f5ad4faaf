"""The fleet's TenancyStore on etcd: orgs and their quotas, network numbers, API tokens and the
audit log, shared by every API replica.

Keys::

    orgs/{slug}                       Org
    org-networks/{slug}               the org's network number
    network-numbers/{number}          the org holding that number (one org a number)
    tokens/{token_id}                 ApiToken (never its secret, never its hash)
    sealed/token-hash/{lookup name}   sealed {"id", "hash"}: the hash only ever sealed, found
                                      by ``Sealer.lookup_name`` (a keyed digest of it)
    audit/{org}/{ulid}                AuditRecord; its ``seq`` is the key's create revision

A token and its sealed hash are written in one transaction, so a token is never findable
without its record, nor a record left behind without its way in.
"""

from __future__ import annotations

import json

from hangar.errors import Conflict, InvalidRequest, NotFound
from hangar.model.machine import new_ulid
from hangar.store.etcd.client import MAX_TXN_OPS, Compare, Delete, EtcdClient, Put, Range, Txn
from hangar.store.etcd.keys import KeyLayout
from hangar.store.etcd.records import answer_kv, with_retries
from hangar.store.etcd.sealed import Sealer, open_hash_index
from hangar.store.protocol import ApiToken, AuditRecord, Org, OrgQuotas

TOKEN_HASH_KIND = "token-hash"


class EtcdTenancyStore:
    def __init__(
        self, client: EtcdClient, sealer: Sealer | None, layout: KeyLayout | None = None
    ) -> None:
        """``sealer``: the fleet's key; a process without it (a host's agent) reads and writes
        everything but tokens."""
        self._client = client
        self._sealer_or_none = sealer
        self._layout = layout or KeyLayout()

    @property
    def _sealer(self) -> Sealer:
        if self._sealer_or_none is None:
            raise InvalidRequest("this process holds no sealing key: tokens are out of reach")
        return self._sealer_or_none

    # orgs
    def _org_key(self, slug: str) -> str:
        return self._layout.record("orgs", slug)

    def create_org(self, slug: str, name: str, now: float, quotas: OrgQuotas | None = None) -> Org:
        org = Org(slug=slug, name=name, created_at=now, quotas=quotas or OrgQuotas())
        if not self._put_new(self._org_key(slug), org.model_dump_json().encode()):
            raise Conflict(f"org {slug} already exists", org=slug)
        return org

    def ensure_org(self, slug: str, now: float, quotas: OrgQuotas | None = None) -> Org:
        org = Org(slug=slug, name=slug, created_at=now, quotas=quotas or OrgQuotas())
        self._put_new(self._org_key(slug), org.model_dump_json().encode())
        found = self.get_org(slug)
        assert found is not None
        return found

    def get_org(self, slug: str) -> Org | None:
        kv = self._client.get(self._org_key(slug))
        return None if kv is None else Org.model_validate_json(kv.value)

    def list_orgs(self) -> list[Org]:
        kvs = self._client.range_prefix(self._layout.records("orgs")).kvs
        return sorted((Org.model_validate_json(kv.value) for kv in kvs), key=lambda o: o.slug)

    def set_quotas(self, slug: str, quotas: OrgQuotas) -> Org:
        key = self._org_key(slug)

        def attempt() -> Org | None:
            kv = self._client.get(key)
            if kv is None:
                raise NotFound(f"org {slug} not found", field="org_slug")
            org = Org.model_validate_json(kv.value).model_copy(update={"quotas": quotas})
            if self._swap(key, kv.mod_revision, org.model_dump_json().encode()):
                return org
            return None

        return with_retries(f"org {slug}", attempt)

    # private networks
    def network_numbers(self) -> dict[int, str]:
        prefix = self._layout.records("network-numbers")
        kvs = self._client.range_prefix(prefix).kvs
        return {int(kv.key[len(prefix) :]): kv.value.decode() for kv in kvs}

    def assign_network_number(self, slug: str, number: int) -> int:
        mine = self._layout.record("org-networks", slug)
        taken = self._layout.record("network-numbers", str(number))
        result = self._client.txn(
            Txn(
                compare=(Compare.absent(mine), Compare.absent(taken)),
                success=(Put(mine, str(number).encode()), Put(taken, slug.encode())),
                failure=(Range(mine),),
            )
        )
        if result.succeeded:
            return number
        held = answer_kv(result, 0)
        if held is not None:
            return int(held.value)
        raise Conflict(f"network number {number} is taken", org=slug, retryable=True)

    # tokens
    def _token_key(self, token_id: str) -> str:
        return self._layout.record("tokens", token_id)

    def _hash_key(self, secret_hash: str) -> str:
        name = self._sealer.lookup_name(secret_hash.encode(), TOKEN_HASH_KIND)
        return self._layout.sealed(TOKEN_HASH_KIND, name)

    def insert_token(self, token: ApiToken, secret_hash: str) -> None:
        key, hash_key = self._token_key(token.id), self._hash_key(secret_hash)
        sealed = self._sealer.seal(
            json.dumps({"id": token.id, "hash": secret_hash}).encode(), hash_key
        )
        result = self._client.txn(
            Txn(
                compare=(Compare.absent(key), Compare.absent(hash_key)),
                success=(Put(key, token.model_dump_json().encode()), Put(hash_key, sealed)),
            )
        )
        if not result.succeeded:
            raise Conflict(f"token {token.id} already exists", token_id=token.id)

    def token_by_hash(self, secret_hash: str) -> ApiToken | None:
        opened = open_hash_index(
            self._client, self._sealer, self._hash_key(secret_hash), secret_hash
        )
        return None if opened is None else self.get_token(str(opened["id"]))

    def get_token(self, token_id: str) -> ApiToken | None:
        kv = self._client.get(self._token_key(token_id))
        return None if kv is None else ApiToken.model_validate_json(kv.value)

    def list_tokens(self, org_slug: str | None = None) -> list[ApiToken]:
        kvs = sorted(
            self._client.range_prefix(self._layout.records("tokens")).kvs,
            key=lambda kv: kv.create_revision,
        )
        tokens = (ApiToken.model_validate_json(kv.value) for kv in kvs)
        return [token for token in tokens if org_slug is None or token.org_slug == org_slug]

    def revoke_token(self, token_id: str, now: float) -> ApiToken:
        key = self._token_key(token_id)

        def attempt() -> ApiToken | None:
            kv = self._client.get(key)
            if kv is None:
                raise NotFound(f"token {token_id} not found", field="token_id")
            token = ApiToken.model_validate_json(kv.value)
            if token.revoked_at is not None:
                return token
            token = token.model_copy(update={"revoked_at": now})
            return (
                token
                if self._swap(key, kv.mod_revision, token.model_dump_json().encode())
                else None
            )

        return with_retries(f"token {token_id}", attempt)

    # audit log
    def add_audit(self, record: AuditRecord) -> AuditRecord:
        key = self._layout.record("audit", record.org_slug, new_ulid())
        put = self._client.put(key, record.model_dump_json(exclude={"seq"}).encode())
        return record.model_copy(update={"seq": put.revision})

    def prune_audit(self, before: float) -> int:
        """Delete the records made before ``before`` (one transaction a page of them)."""
        pruned = 0
        kvs = self._client.range_prefix(self._layout.records("audit")).kvs
        old = [kv for kv in kvs if AuditRecord.model_validate_json(kv.value).timestamp < before]
        for start in range(0, len(old), MAX_TXN_OPS):
            page = old[start : start + MAX_TXN_OPS]
            self._client.txn(Txn(success=tuple(Delete(kv.key) for kv in page)))
            pruned += len(page)
        return pruned

    def list_audit(
        self, org_slug: str | None = None, limit: int = 100, before_seq: int | None = None
    ) -> list[AuditRecord]:
        if limit <= 0 or (before_seq is not None and before_seq <= 1):
            return []
        prefix = (
            self._layout.records("audit", org_slug)
            if org_slug is not None
            else self._layout.records("audit")
        )
        result = self._client.range(
            Range(
                prefix,
                prefix=True,
                limit=limit,
                sort_target="CREATE",
                descending=True,
                max_create_revision=(before_seq - 1) if before_seq is not None else 0,
            )
        )
        return [
            AuditRecord.model_validate_json(kv.value).model_copy(update={"seq": kv.create_revision})
            for kv in result.kvs
        ]

    # -- helpers -----------------------------------------------------------------------------

    def _put_new(self, key: str, value: bytes) -> bool:
        result = self._client.txn(Txn(compare=(Compare.absent(key),), success=(Put(key, value),)))
        return result.succeeded

    def _swap(self, key: str, revision: int, value: bytes) -> bool:
        result = self._client.txn(
            Txn(compare=(Compare.mod_revision_is(key, revision),), success=(Put(key, value),))
        )
        return result.succeeded
