"""A machine's place on its host's network: tap, MAC, addresses, org. The one record of it is
the tap itself: its interface alias holds the attachment (:meth:`Attachment.alias`), so the
kernel's state alone says which taps belong to which machine, and the firewall is rendered
from the taps that exist (nothing to lose in a crash between two steps)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from pydantic import BaseModel, ConfigDict, field_validator

from hangar.net.addressing import link_local_of
from hangar.vmm.driver import InterfaceName, MacAddress

ALIAS_MARK = "hangar1"
# IFALIASZ is 256 bytes, the terminating NUL included.
ALIAS_MAX_BYTES = 255
_ALIAS_KEYS = {"m": "machine_id", "o": "org_number", "t": "tap", "e": "mac", "6": "ip6", "4": "ip4"}


class Attachment(BaseModel):
    model_config = ConfigDict(frozen=True)

    machine_id: str
    org_number: int
    tap: InterfaceName
    mac: MacAddress
    ip6: IPv6Address
    ip4: IPv4Address | None = None
    """The egress address (None on a host without egress)."""

    @field_validator("machine_id")
    @classmethod
    def _machine_id(cls, value: str) -> str:
        if not value or any(ch.isspace() or not ch.isprintable() or ch == "=" for ch in value):
            raise ValueError(f"machine id {value!r} must be one printable word without '='")
        return value

    @property
    def link_local(self) -> IPv6Address:
        return link_local_of(self.mac)

    def alias(self) -> str:
        """``hangar1 m=ID o=ORG t=TAP e=MAC 6=IP6 [4=IP4]``: what the tap's alias holds."""
        words = [
            ALIAS_MARK,
            f"m={self.machine_id}",
            f"o={self.org_number}",
            f"t={self.tap}",
            f"e={self.mac}",
            f"6={self.ip6}",
        ]
        if self.ip4 is not None:
            words.append(f"4={self.ip4}")
        text = " ".join(words)
        if len(text.encode()) > ALIAS_MAX_BYTES:
            raise ValueError(f"attachment of {self.machine_id} does not fit an interface alias")
        return text

    @classmethod
    def from_alias(cls, alias: str | None) -> Attachment | None:
        """The attachment an alias holds, or None for an alias hangar did not write whole."""
        words = (alias or "").split()
        if not words or words[0] != ALIAS_MARK:
            return None
        fields: dict[str, str] = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or key not in _ALIAS_KEYS:
                return None
            fields[_ALIAS_KEYS[key]] = value
        try:
            return cls.model_validate(fields)
        except ValueError:
            return None
