"""Where hangar's records live in etcd: one key layout under a configurable prefix.

::

    {prefix}/claims/{host_id}          the scheduler's HostState of a host (claims, GPU states)
    {prefix}/hosts/{host_id}           a host's live registration, under its agent's lease
    {prefix}/sealed/{kind}/{name}      an encrypted value (volume key, app secret, token hash)
    {prefix}/{kind}/{name}/...         a record of the shared stores (``record``): apps,
                                       machines (under their app), machine names, config
                                       versions, events, leases, orgs, tokens, audit, volumes,
                                       LLM deployments, keys and token counters (``llm.py``),
                                       the usage the agents publish (``usage.py``)
    {prefix}/queue/{host_id}/{run_id}   a run addressed to a host's agent (``hangar.fleet``)
    {prefix}/runs/{host_id}/{machine}  what that agent published about a machine's runs

Every name is one path segment, so a prefix range over ``claims/`` or ``hosts/`` never picks up
a key of another kind or another fleet sharing the cluster under another prefix. Names of
records that a user chooses (machine names, org slugs) are percent-encoded into one segment
(``segment``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from hangar.errors import InvalidRequest

DEFAULT_PREFIX = "/hangar"
MAX_NAME_LENGTH = 253


def check_name(name: str, field: str) -> str:
    """A name used as one key segment: non-empty, no ``/``, printable ASCII."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"{field} must be 1 to {MAX_NAME_LENGTH} characters", field=field)
    if "/" in name or not name.isascii() or not name.isprintable() or " " in name:
        raise InvalidRequest(
            f"{field} {name!r} must be printable ASCII without '/' or spaces", field=field
        )
    return name


def segment(name: str) -> str:
    """Any string as one key segment: percent-encoded, ``%`` alone for the empty string."""
    return quote(name, safe="-_.~") or "%"


def unsegment(text: str) -> str:
    return "" if text == "%" else unquote(text)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        segments = self.prefix.split("/")
        if not self.prefix.startswith("/") or self.prefix.endswith("/") or len(segments) < 2:
            raise InvalidRequest(
                f"etcd prefix {self.prefix!r} must start with '/' and not end with it",
                field="prefix",
            )
        for segment in segments[1:]:
            check_name(segment, "prefix")

    @property
    def claims(self) -> str:
        return f"{self.prefix}/claims/"

    def claim(self, host_id: str) -> str:
        return self.claims + check_name(host_id, "host_id")

    @property
    def hosts(self) -> str:
        return f"{self.prefix}/hosts/"

    def host(self, host_id: str) -> str:
        return self.hosts + check_name(host_id, "host_id")

    def sealed_kind(self, kind: str) -> str:
        return f"{self.prefix}/sealed/{check_name(kind, 'kind')}/"

    def sealed(self, kind: str, name: str) -> str:
        return self.sealed_kind(kind) + check_name(name, "name")

    def record(self, kind: str, *names: str) -> str:
        """The key of one record of ``kind`` (names encoded by ``segment``)."""
        return f"{self.prefix}/{check_name(kind, 'kind')}/" + "/".join(map(segment, names))

    def records(self, kind: str, *names: str) -> str:
        """The prefix of every record of ``kind`` under ``names``."""
        return f"{self.prefix}/{check_name(kind, 'kind')}/" + "".join(
            segment(name) + "/" for name in names
        )
