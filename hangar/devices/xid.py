"""Xid events: the NVIDIA driver's error reports, forwarded from the guest.

Inside a GPU machine the guest's driver logs ``NVRM: Xid (PCI:0000:01:00): 79, pid=...``
to its kernel log; hangar's guest init forwards such lines over the control channel as
``{"type": "xid", "line": "..."}`` events. The host maps the guest's PCI address back to
the host GPU (QMP ``query-pci`` tells where QEMU put each passed-through device, by the
``id`` hangar gave it) and records the event on that GPU; codes that mean damaged memory or
a lost GPU quarantine it at the handoff.

A guest is untrusted: it can forge lines. A forged line can only take its own GPU out of
the pool (quarantine is the safe direction), and the host keeps at most
:data:`MAX_XIDS_PER_MACHINE` events of at most :data:`MAX_LINE` characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

MAX_XIDS_PER_MACHINE = 100
MAX_LINE = 512

_XID = re.compile(
    r"NVRM: Xid \(PCI:(?P<address>[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}(?:\.[0-7])?)\)"
    r": (?P<code>\d+),\s*(?P<text>.*)$"
)

# Xids after which the GPU must not go to another tenant without an operator's look:
# memory errors (48 DBE, 63/64 page retirement or row remap events, 92 excess SBE,
# 94/95 contained/uncontained ECC, 140 unrecovered ECC), a GPU off the bus (79),
# NVLink (74) and GSP firmware failures (119, 120).
QUARANTINE_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})


class XidEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    guest_address: str
    """The GPU's address inside the guest, as the driver printed it (function 0 added)."""
    host_bdf: str | None
    code: int
    text: str

    @property
    def needs_quarantine(self) -> bool:
        return self.code in QUARANTINE_XIDS


def parse_xid(line: str, address_map: Mapping[str, str] | None = None) -> XidEvent | None:
    """An Xid event from one kernel log line (``/dev/kmsg`` prefix allowed), or None."""
    match = _XID.search(line[:MAX_LINE])
    if match is None:
        return None
    address = match["address"].lower()
    if "." not in address:
        address += ".0"
    domain, rest = address.split(":", 1)
    address = f"{int(domain, 16):04x}:{rest}"
    return XidEvent(
        guest_address=address,
        host_bdf=(address_map or {}).get(address),
        code=int(match["code"]),
        text=match["text"].strip(),
    )


def xid_events(
    control_events: Iterable[Mapping[str, Any]], address_map: Mapping[str, str]
) -> list[XidEvent]:
    """The Xid events among a guest's control events, at most :data:`MAX_XIDS_PER_MACHINE`."""
    found = []
    for event in control_events:
        if event.get("type") != "xid" or not isinstance(event.get("line"), str):
            continue
        parsed = parse_xid(event["line"], address_map)
        if parsed is not None:
            found.append(parsed)
            if len(found) >= MAX_XIDS_PER_MACHINE:
                break
    return found


def guest_addresses(
    query_pci: Iterable[Mapping[str, Any]], device_ids: Mapping[str, str]
) -> dict[str, str]:
    """Guest PCI address -> host BDF, from QMP ``query-pci`` and the ``id`` -> host BDF map
    of the ``-device vfio-pci,...,id=ID`` options hangar wrote."""
    found: dict[str, str] = {}

    def walk(bus_number: int, devices: Iterable[Mapping[str, Any]]) -> None:
        for device in devices:
            qdev = device.get("qdev_id")
            if isinstance(qdev, str) and qdev in device_ids:
                address = f"0000:{bus_number:02x}:{device['slot']:02x}.{device['function']}"
                found[address] = device_ids[qdev]
            bridge = device.get("pci_bridge")
            if bridge:
                walk(int(bridge["bus"]["secondary"]), bridge.get("devices", []))

    for bus in query_pci:
        walk(int(bus["bus"]), bus.get("devices", []))
    return found
