"""The fleet's invariants, checked over its shared records (tests run them after every fault
scenario; an operator can run them against a live fleet):

- every live machine has exactly one owner: a host that has a claim record;
- no resource is claimed twice: a machine holds claims on one host at most, and no GPU of a
  host is in two claims;
- every claim has an owner: a live machine recorded on that same host.
"""

from __future__ import annotations

from collections import Counter

from hangar.scheduler import ClaimStore
from hangar.store.protocol import MachineStore


def fleet_violations(machines: MachineStore, claims: ClaimStore) -> list[str]:
    """Every broken invariant, one line each (empty: the fleet is consistent)."""
    problems: list[str] = []
    hosts = claims.snapshot()
    live = {machine.id: machine for machine in machines.list_machines(None)}
    for machine in live.values():
        if not machine.host_id or machine.host_id not in hosts:
            problems.append(f"machine {machine.id} has no known host ({machine.host_id!r})")
    held_on: Counter[str] = Counter()
    for host_id, record in hosts.items():
        gpu_holders: Counter[int] = Counter()
        for claim in record.state.claims:
            held_on[claim.machine_id] += 1
            gpu_holders.update(claim.gpu_indexes)
            owner = live.get(claim.machine_id)
            if owner is None or owner.host_id != host_id:
                problems.append(f"claim of {claim.machine_id} on {host_id} has no owner there")
        for index, count in gpu_holders.items():
            if count > 1:
                problems.append(f"GPU {index} of {host_id} is in {count} claims")
    for machine_id, count in held_on.items():
        if count > 1:
            problems.append(f"machine {machine_id} holds claims on {count} hosts")
    return problems
