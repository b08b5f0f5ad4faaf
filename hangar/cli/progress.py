"""``hangar machine run``'s progress: each stage of the boot as the agent's run reaches it
(read from the machine's runs: ``GET .../runs``), a line per stage done with its time, a
spinner on the stage in progress."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from hangar.cli.client import HangarClient
from hangar.cli.output import fail

BOOT_OPERATIONS = ("create", "start", "update", "restart")
SETTLED = frozenset({"started", "stopped", "failed", "launch_failed", "destroyed"})
STAGES = {
    "resolve_image": ("pulling the image", "image ready"),
    "place_machine": ("placing it on a host", "placed"),
    "bind_gpus": ("binding its GPUs to VFIO", "GPUs bound"),
    "prepare_root_disk": ("building the root filesystem", "root filesystem built"),
    "prepare_initrd": ("building the initramfs", "initramfs built"),
    "launch_vm": ("booting", "booted"),
}
"""Step -> (while it runs, once done). Other steps are bookkeeping and are not shown, nor
are these when they had nothing to do (a CPU machine binds no GPU)."""
POLL_S = 0.15
DEFAULT_TIMEOUT_S = 600.0


def boot_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest run that boots the machine."""
    booting = [run for run in runs if run.get("request", {}).get("operation") in BOOT_OPERATIONS]
    return booting[-1] if booting else None


def follow_boot(
    api: HangarClient,
    app_name: str,
    machine_id: str,
    out: Console,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Show the boot's stages until the machine settles; returns the machine."""
    shown: set[str] = set()
    deadline = time.monotonic() + timeout_s
    with out.status("waiting for the agent...") as status:
        while True:
            machine: dict[str, Any] = api.get_machine(app_name, machine_id)
            run = boot_run(api.runs(app_name, machine_id))
            if run is not None:
                progress = run.get("progress", {})
                seconds = progress.get("step_seconds", {})
                for step in run.get("steps_done", []):
                    if step not in STAGES or step in shown:
                        continue
                    shown.add(step)
                    took = seconds.get(step)
                    if took is not None:
                        out.print(f"  [green]✓[/green] {STAGES[step][1]} ({took:.2f}s)")
                    elif step == "resolve_image":
                        out.print(f"  [green]✓[/green] {STAGES[step][1]} (cached)")
                current = progress.get("current_step", "")
                if current in STAGES:
                    status.update(f"{STAGES[current][0]}...")
            if machine["state"] in SETTLED:
                return machine
            if time.monotonic() > deadline:
                fail(f"machine {machine_id} still {machine['state']} after {timeout_s:.0f}s")
            time.sleep(POLL_S)
