"""The fleet's LlmStore on etcd: model deployments, their API keys and the tokens they served,
shared by every API replica.

Keys::

    llm-deployments/{id}                   Deployment
    llm-deployment-names/{org}/{name}      its id (one deployment a name in an org)
    llm-keys/{deployment}/{key_id}         {"key": ApiKey, "lookup": the lookup name below}
    sealed/llm-key-hash/{lookup name}      sealed {"id", "deployment", "hash"}: the key's hash
                                           only ever sealed, found by ``Sealer.lookup_name``
    llm-token-totals/{org}/{deployment}    all-time counters (requests, prompt, completion)
    llm-token-hours/{org}/{hour}/{dep}     the same counters for one hour (unix hour, padded)
    llm-token-records/{org}/{hour}/{...}   each request's TokenUsage, kept RAW_RETENTION_S

Token usage: each request writes its record and moves both counters in one transaction that
compares the counters' mod revisions (a concurrent writer on another replica makes one of the
two read again), so the counters always equal what the records added. ``token_totals`` reads
counters only (one key a deployment); ``tokens_by_deployment`` adds the hour counters of the
window's whole hours and, for the partial hour at each end, the records of that hour
filtered to the second — so its cost grows with the window's length and two hours of
requests, never with all-time usage. An edge hour older than ``RAW_RETENTION_S`` has lost its
records: its counters are counted pro rata of the share of the hour inside the window. Hour
counters older than ``HOUR_RETENTION_S`` (the usage API's longest window) are pruned too,
each time a deployment's first request of an hour is recorded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from hangar.errors import Conflict
from hangar.model.llm import ApiKey, Deployment, TokenTotals, TokenUsage
from hangar.model.machine import new_ulid
from hangar.store.etcd.client import (
    MAX_TXN_OPS,
    Compare,
    Delete,
    EtcdClient,
    KeyValue,
    Op,
    Put,
    Range,
    Txn,
)
from hangar.store.etcd.keys import KeyLayout, unsegment
from hangar.store.etcd.records import answer_kv, with_retries
from hangar.store.etcd.sealed import Sealer, open_hash_index

KEY_HASH_KIND = "llm-key-hash"
HOUR_S = 3600
RAW_RETENTION_S = 2 * 24 * HOUR_S
"""How long each request's record is kept (the exact edges of a usage window)."""
HOUR_RETENTION_S = 400 * 24 * HOUR_S
"""How long hour counters are kept: the usage API's longest window."""
_HOUR_DIGITS = 10


def _hour(at: float) -> int:
    return max(0, math.floor(at / HOUR_S))


def _hour_name(hour: int) -> str:
    return f"{hour:0{_HOUR_DIGITS}d}"


def _counts(kv: KeyValue | None) -> TokenTotals:
    return TokenTotals() if kv is None else TokenTotals.model_validate_json(kv.value)


def _plus(totals: TokenTotals, usage: TokenUsage) -> TokenTotals:
    return TokenTotals(
        requests=totals.requests + 1,
        prompt_tokens=totals.prompt_tokens + usage.prompt_tokens,
        completion_tokens=totals.completion_tokens + usage.completion_tokens,
    )


def _sum(items: Iterable[TokenTotals]) -> TokenTotals:
    requests = prompt = completion = 0
    for item in items:
        requests += item.requests
        prompt += item.prompt_tokens
        completion += item.completion_tokens
    return TokenTotals(requests=requests, prompt_tokens=prompt, completion_tokens=completion)


def _guard(key: str, kv: KeyValue | None) -> Compare:
    return Compare.absent(key) if kv is None else Compare.mod_revision_is(key, kv.mod_revision)


class EtcdLlmStore:
    def __init__(self, client: EtcdClient, sealer: Sealer, layout: KeyLayout | None = None) -> None:
        self._client = client
        self._sealer = sealer
        self._layout = layout or KeyLayout()

    # -- keys -------------------------------------------------------------------------------

    def _deployment_key(self, deployment_id: str) -> str:
        return self._layout.record("llm-deployments", deployment_id)

    def _name_key(self, org: str, name: str) -> str:
        return self._layout.record("llm-deployment-names", org, name)

    def _key_record(self, deployment_id: str, key_id: str) -> str:
        return self._layout.record("llm-keys", deployment_id, key_id)

    def _hash_key(self, lookup: str) -> str:
        return self._layout.sealed(KEY_HASH_KIND, lookup)

    def _totals_key(self, org: str, deployment: str) -> str:
        return self._layout.record("llm-token-totals", org, deployment)

    def _hour_key(self, org: str, hour: int, deployment: str) -> str:
        return self._layout.record("llm-token-hours", org, _hour_name(hour), deployment)

    def _hours(self, org: str, hour: int | None = None) -> str:
        if hour is None:
            return self._layout.records("llm-token-hours", org)
        return self._layout.records("llm-token-hours", org, _hour_name(hour))

    def _records(self, org: str, hour: int | None = None) -> str:
        if hour is None:
            return self._layout.records("llm-token-records", org)
        return self._layout.records("llm-token-records", org, _hour_name(hour))

    # -- deployments ------------------------------------------------------------------------

    def insert_deployment(self, deployment: Deployment) -> None:
        key = self._deployment_key(deployment.id)
        name_key = self._name_key(deployment.org, deployment.name)
        result = self._client.txn(
            Txn(
                compare=(Compare.absent(name_key), Compare.absent(key)),
                success=(
                    Put(key, deployment.model_dump_json().encode()),
                    Put(name_key, deployment.id.encode()),
                ),
            )
        )
        if not result.succeeded:
            raise Conflict(
                f"org {deployment.org} already has a deployment named {deployment.name}",
                field="name",
            )

    def get_deployment(self, deployment_id: str) -> Deployment | None:
        kv = self._client.get(self._deployment_key(deployment_id))
        return None if kv is None else Deployment.model_validate_json(kv.value)

    def deployment_named(self, org: str, name: str) -> Deployment | None:
        kv = self._client.get(self._name_key(org, name))
        return None if kv is None else self.get_deployment(kv.value.decode())

    def list_deployments(self, org: str | None = None) -> list[Deployment]:
        kvs = self._client.range_prefix(self._layout.records("llm-deployments")).kvs
        found = [Deployment.model_validate_json(kv.value) for kv in kvs]
        return sorted(
            (d for d in found if org is None or d.org == org), key=lambda d: (d.org, d.name)
        )

    def save_deployment(self, deployment: Deployment) -> None:
        """Replace a recorded deployment (nothing when it is gone); its org and name stay."""
        key = self._deployment_key(deployment.id)
        self._client.txn(
            Txn(
                compare=(Compare(key, "VERSION", "GREATER", 0),),
                success=(Put(key, deployment.model_dump_json().encode()),),
            )
        )

    def delete_deployment(self, deployment_id: str) -> None:
        """The deployment and its name first (its keys stop opening at once: a key's
        deployment must exist), then its keys, a page of them a transaction."""
        found = self.get_deployment(deployment_id)
        if found is not None:
            self._client.txn(
                Txn(
                    success=(
                        Delete(self._deployment_key(deployment_id)),
                        Delete(self._name_key(found.org, found.name)),
                    )
                )
            )
        keys = self._client.range_prefix(self._layout.records("llm-keys", deployment_id)).kvs
        ops: list[Op] = []
        for kv in keys:
            ops.append(Delete(kv.key))
            ops.append(Delete(self._hash_key(str(json.loads(kv.value)["lookup"]))))
        for start in range(0, len(ops), MAX_TXN_OPS):
            self._client.txn(Txn(success=tuple(ops[start : start + MAX_TXN_OPS])))

    # -- API keys ---------------------------------------------------------------------------

    def insert_key(self, key: ApiKey, secret_hash: str) -> None:
        lookup = self._sealer.lookup_name(secret_hash.encode(), KEY_HASH_KIND)
        record, hash_key = self._key_record(key.deployment, key.id), self._hash_key(lookup)
        sealed = self._sealer.seal(
            json.dumps({"id": key.id, "deployment": key.deployment, "hash": secret_hash}).encode(),
            hash_key,
        )
        body = {"key": key.model_dump(mode="json"), "lookup": lookup}
        result = self._client.txn(
            Txn(
                compare=(Compare.absent(record), Compare.absent(hash_key)),
                success=(Put(record, json.dumps(body).encode()), Put(hash_key, sealed)),
            )
        )
        if not result.succeeded:
            raise Conflict(f"API key {key.id} already exists", field="key")

    def key_by_hash(self, secret_hash: str) -> ApiKey | None:
        lookup = self._sealer.lookup_name(secret_hash.encode(), KEY_HASH_KIND)
        opened = open_hash_index(self._client, self._sealer, self._hash_key(lookup), secret_hash)
        if opened is None:
            return None
        record = self._client.get(self._key_record(str(opened["deployment"]), str(opened["id"])))
        if record is None:
            return None
        return ApiKey.model_validate(json.loads(record.value)["key"])

    # -- tokens -----------------------------------------------------------------------------

    def record_tokens(self, usage: TokenUsage) -> None:
        hour = _hour(usage.at)
        totals_key = self._totals_key(usage.org, usage.deployment)
        hour_key = self._hour_key(usage.org, hour, usage.deployment)
        record_key = self._records(usage.org, hour) + new_ulid()
        record = Put(record_key, usage.model_dump_json().encode())

        def attempt() -> bool | None:
            read = self._client.txn(Txn(success=(Range(totals_key), Range(hour_key))))
            totals, this_hour = answer_kv(read, 0), answer_kv(read, 1)
            result = self._client.txn(
                Txn(
                    compare=(_guard(totals_key, totals), _guard(hour_key, this_hour)),
                    success=(
                        Put(totals_key, _plus(_counts(totals), usage).model_dump_json().encode()),
                        Put(hour_key, _plus(_counts(this_hour), usage).model_dump_json().encode()),
                        record,
                    ),
                )
            )
            if not result.succeeded:
                return None
            return this_hour is None

        if with_retries(f"token usage of {usage.deployment}", attempt):
            self._prune(usage.org, hour)

    def _prune(self, org: str, hour: int) -> None:
        """Drop the org's records and hour counters past their retention."""
        records_before = self._records(org, max(0, hour - RAW_RETENTION_S // HOUR_S))
        hours_before = self._hours(org, max(0, hour - HOUR_RETENTION_S // HOUR_S))
        self._client.txn(
            Txn(
                success=(
                    Delete(self._records(org), end=records_before),
                    Delete(self._hours(org), end=hours_before),
                )
            )
        )

    def token_totals(self, org: str, deployment: str | None = None) -> TokenTotals:
        if deployment is not None:
            return _counts(self._client.get(self._totals_key(org, deployment)))
        kvs = self._client.range_prefix(self._layout.records("llm-token-totals", org)).kvs
        return _sum(_counts(kv) for kv in kvs)

    def tokens_by_deployment(self, org: str, since: float, until: float) -> dict[str, TokenTotals]:
        """Totals per deployment of the requests served in ``[since, until)``."""
        if until <= since:
            return {}
        parts: dict[str, list[TokenTotals]] = {}
        first, last = _hour(since), _hour(until)
        whole_from = first if since <= first * HOUR_S else first + 1
        whole_to = last  # the hours [whole_from, whole_to) lie wholly inside the window
        if whole_from < whole_to:
            for kv in self._client.range_between(
                self._hours(org, whole_from), self._hours(org, whole_to)
            ).kvs:
                deployment = self._deployment_of(kv.key)
                parts.setdefault(deployment, []).append(_counts(kv))
        edges = {hour for hour in (first, last) if not whole_from <= hour < whole_to}
        for hour in sorted(edges):
            for deployment, totals in self._edge(org, hour, since, until).items():
                parts.setdefault(deployment, []).append(totals)
        summed = {deployment: _sum(items) for deployment, items in parts.items()}
        return {d: totals for d, totals in sorted(summed.items()) if totals.requests}

    @staticmethod
    def _deployment_of(key: str) -> str:
        return unsegment(key.rsplit("/", 1)[-1])

    def _edge(self, org: str, hour: int, since: float, until: float) -> dict[str, TokenTotals]:
        """The requests of one hour that lie in ``[since, until)``: from its records when it
        still has them all, else its counters pro rata."""
        counters = {
            self._deployment_of(kv.key): _counts(kv)
            for kv in self._client.range_prefix(self._hours(org, hour)).kvs
        }
        if not counters:
            return {}
        usages = [
            TokenUsage.model_validate_json(kv.value)
            for kv in self._client.range_prefix(self._records(org, hour)).kvs
        ]
        if len(usages) == sum(c.requests for c in counters.values()):
            exact: dict[str, list[TokenTotals]] = {}
            for usage in usages:
                if since <= usage.at < until:
                    exact.setdefault(usage.deployment, []).append(_plus(TokenTotals(), usage))
            return {deployment: _sum(items) for deployment, items in exact.items()}
        low, high = max(since, hour * HOUR_S), min(until, (hour + 1) * HOUR_S)
        share = max(0.0, high - low) / HOUR_S
        return {
            deployment: TokenTotals(
                requests=round(c.requests * share),
                prompt_tokens=round(c.prompt_tokens * share),
                completion_tokens=round(c.completion_tokens * share),
            )
            for deployment, c in counters.items()
        }
