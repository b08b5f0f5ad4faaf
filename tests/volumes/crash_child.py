"""Run one volume plan in a process of its own that SIGKILLs itself right after a named step,
as the agent's ``HANGAR_CRASH_AFTER_STEP`` does (``python -m tests.volumes.crash_child``).

The plan is described by a JSON argument (see :func:`build_plan`), so the test rebuilds the
very same plan in its own process and runs it again to show that it converges.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hangar.volumes.host import VolumeHost
from hangar.volumes.model import ForkOf, FromSnapshot, VolumeSource, VolumeSpec
from hangar.volumes.plan import VolumePlan
from tests.volumes.helpers import new_host


def build_plan(host: VolumeHost, request: dict[str, Any]) -> VolumePlan:
    operation = request["operation"]
    if operation == "create":
        source: VolumeSource | None = None
        if "snapshot_id" in request:
            source = FromSnapshot(
                volume_id=request["source_id"], snapshot_id=request["snapshot_id"]
            )
        elif "source_id" in request:
            source = ForkOf(volume_id=request["source_id"])
        return host.create_plan(VolumeSpec.model_validate(request["spec"]), source)
    if operation == "extend":
        return host.extend_plan(request["volume_id"], request["size_gb"])
    if operation == "snapshot":
        return host.snapshot_plan(request["volume_id"], request["snapshot_id"])
    if operation == "delete_snapshot":
        return host.delete_snapshot_plan(request["volume_id"], request["snapshot_id"])
    if operation == "delete":
        return host.delete_plan(request["volume_id"])
    raise ValueError(f"unknown operation {operation}")


def main() -> None:
    root, crash_after, request = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

    def after_step(name: str) -> None:
        if name == crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(build_plan(new_host(root), request).execute(after_step))


if __name__ == "__main__":
    main()
