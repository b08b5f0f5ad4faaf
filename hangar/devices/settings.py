"""Settings a tenant can stage on a passed-through GPU, read and put back at every handoff.

A passthrough tenant controls the GPU. It can stage ECC, MIG, confidential computing (CC)
or protected PCIe (PPCIe) changes that take effect "after the next reset", and the next
reset is hangar's. So at every handoff hangar reads each setting's current and pending
value, stages the operator's default where either differs, resets (the scrub's bus reset),
reads again and quarantines the GPU if anything still differs.

Two sources, each read where the GPU must be bound for it:

- :class:`NvmlSettings`: ECC and MIG through NVML, with the GPU on the host's nvidia driver;
  every call runs in a killable device worker (:mod:`hangar.devices.worker`);
- :class:`AdminToolsSettings`: CC and PPCIe through NVIDIA's gpu-admin-tools
  (``nvidia_gpu_tools.py``), with the GPU on vfio-pci or on no driver, as that tool wants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from hangar.devices.nvml import gpu_handle, load_nvml, nvml_session
from hangar.devices.readiness import CommandRunner, VendorTool
from hangar.devices.worker import DeviceDeadlines, DeviceRunner, WorkerRunner
from hangar.errors import DeviceError

SettingName = Literal["ecc", "mig", "cc", "ppcie"]
BoundTo = Literal["nvidia", "vfio-pci"]

SETTINGS_TARGET = "hangar.devices.settings"


class OperatorDefaults(BaseModel):
    """What every GPU must be set to between tenants (the operator's choice)."""

    model_config = ConfigDict(frozen=True)

    ecc: Literal["enabled", "disabled"] = "enabled"
    mig: Literal["enabled", "disabled"] = "disabled"
    """Passthrough needs MIG off: MIG instances are the sandbox tier's."""
    cc: Literal["off", "on", "devtools"] = "off"
    ppcie: Literal["off", "on"] = "off"

    def value(self, name: SettingName) -> str:
        return str(getattr(self, name))


class SettingState(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: SettingName
    current: str
    pending: str
    """What the setting becomes after the next reset."""

    def is_at(self, value: str) -> bool:
        return self.current == value and self.pending == value


class StagedSettings(BaseModel):
    bdf: str
    settings: list[SettingState]
    unsupported: list[SettingName] = []
    """Settings this GPU does not have (ECC on a GeForce, CC before Hopper)."""

    def get(self, name: SettingName) -> SettingState | None:
        return next((s for s in self.settings if s.name == name), None)

    def mismatches(self, defaults: OperatorDefaults) -> list[str]:
        """``name: current X, pending Y, default Z`` for each setting off its default."""
        return [
            f"{s.name}: current {s.current}, pending {s.pending}, default {defaults.value(s.name)}"
            for s in self.settings
            if not s.is_at(defaults.value(s.name))
        ]

    def needs_reset(self, defaults: OperatorDefaults) -> bool:
        """Some current value differs from its default: only a reset applies the default."""
        return any(s.current != defaults.value(s.name) for s in self.settings)


class SettingsSource(Protocol):
    names: tuple[SettingName, ...]
    bound_to: BoundTo
    """The driver the GPU must be bound to for this source to read or stage."""

    def read(self, bdf: str) -> tuple[list[SettingState], list[SettingName]]:
        """The settings it knows, and those the GPU does not support."""
        ...

    def stage(self, bdf: str, name: SettingName, value: str) -> None:
        """Make ``value`` the pending value of ``name`` (it applies at the next reset)."""
        ...


class NvmlSettings:
    """ECC and MIG modes through NVML, each call in a killable worker."""

    names: tuple[SettingName, ...] = ("ecc", "mig")
    bound_to: BoundTo = "nvidia"

    def __init__(
        self,
        runner: DeviceRunner | None = None,
        *,
        module: str = "pynvml",
        deadlines: DeviceDeadlines | None = None,
    ) -> None:
        self.runner = runner or WorkerRunner()
        self.module = module
        self.deadlines = deadlines or DeviceDeadlines()

    def read(self, bdf: str) -> tuple[list[SettingState], list[SettingName]]:
        report = self.runner.call(
            "hangar.devices.nvml:read_nvml_gpu",
            {"bdf": bdf, "module": self.module},
            timeout_s=self.deadlines.nvml_s,
            what=f"reading {bdf}'s ECC and MIG modes through NVML",
        )
        states: list[SettingState] = []
        unsupported: list[SettingName] = []
        for name, current, pending in (
            ("ecc", report["ecc_mode"], report["ecc_mode_pending"]),
            ("mig", report["mig_mode"], report["mig_mode_pending"] or report["mig_mode"]),
        ):
            if current == "unsupported":
                unsupported.append(name)  # type: ignore[arg-type]
            elif current == "unknown" or pending == "unknown":
                raise DeviceError(
                    f"NVML did not report {bdf}'s {name} mode: {report['errors']}",
                    bdf=bdf,
                    reason="settings_unreadable",
                )
            else:
                states.append(SettingState(name=name, current=current, pending=pending))  # type: ignore[arg-type]
        return states, unsupported

    def stage(self, bdf: str, name: SettingName, value: str) -> None:
        self.runner.call(
            f"{SETTINGS_TARGET}:stage_nvml_setting",
            {"bdf": bdf, "name": name, "value": value, "module": self.module},
            timeout_s=self.deadlines.nvml_s,
            what=f"staging {name}={value} on {bdf} through NVML",
        )


def stage_nvml_setting(bdf: str, name: str, value: str, module: str = "pynvml") -> None:
    """Worker target: set the pending ECC or MIG mode."""
    with nvml_session(load_nvml(module)) as nvml:
        handle = gpu_handle(nvml, bdf)
        enabled = value == "enabled"
        try:
            if name == "ecc":
                nvml.nvmlDeviceSetEccMode(
                    handle, nvml.NVML_FEATURE_ENABLED if enabled else nvml.NVML_FEATURE_DISABLED
                )
            elif name == "mig":
                nvml.nvmlDeviceSetMigMode(
                    handle,
                    nvml.NVML_DEVICE_MIG_ENABLE if enabled else nvml.NVML_DEVICE_MIG_DISABLE,
                )
            else:
                raise DeviceError(f"NVML does not stage {name}", bdf=bdf, setting=name)
        except nvml.NVMLError as error:
            raise DeviceError(
                f"NVML refused to stage {name}={value} on {bdf}: {error}",
                bdf=bdf,
                setting=name,
                reason="stage_refused",
            ) from error


_MODE_LINE = re.compile(r"\b(CC|PPCIe) mode is (\S+)")
_KNOB_LINE = re.compile(r"^\s*(?:.*\s)?([a-z][a-z0-9-]*) = (\d+)\s*$")


class AdminToolsSettings:
    """CC and PPCIe modes through gpu-admin-tools (``--query-cc-mode``,
    ``--query-cc-settings``, ``--set-cc-mode``; the same for ``ppcie``)."""

    names: tuple[SettingName, ...] = ("cc", "ppcie")
    bound_to: BoundTo = "vfio-pci"

    def __init__(
        self,
        tool: Sequence[str] = ("nvidia_gpu_tools.py",),
        runner: CommandRunner | None = None,
        deadlines: DeviceDeadlines | None = None,
    ) -> None:
        self.tool = VendorTool(tool, runner, (deadlines or DeviceDeadlines()).command_s)

    def _run(self, bdf: str, *options: str) -> str:
        done = self.tool.run(f"--gpu-bdf={bdf}", *options, reason="settings_unreadable")
        return done.stdout + done.stderr

    def read(self, bdf: str) -> tuple[list[SettingState], list[SettingName]]:
        states: list[SettingState] = []
        unsupported: list[SettingName] = []
        for name, flag in (("cc", "cc"), ("ppcie", "ppcie")):
            text = self._run(bdf, f"--query-{flag}-mode", f"--query-{flag}-settings")
            if "not supported" in text:
                unsupported.append(name)  # type: ignore[arg-type]
                continue
            current = _MODE_LINE.search(text)
            knobs: dict[str, str] = {}
            for line in text.splitlines():
                if (knob := _KNOB_LINE.match(line)) is not None:
                    knobs[knob.group(1)] = knob.group(2)
            if current is None or "enable" not in knobs:
                raise DeviceError(
                    f"gpu-admin-tools printed no {name} mode for {bdf}",
                    bdf=bdf,
                    reason="settings_unreadable",
                    output=text[-500:],
                )
            pending = "off"
            if knobs["enable"] == "1":
                pending = "devtools" if knobs.get("enable-devtools") == "1" else "on"
            states.append(SettingState(name=name, current=current.group(2), pending=pending))  # type: ignore[arg-type]
        return states, unsupported

    def stage(self, bdf: str, name: SettingName, value: str) -> None:
        self._run(bdf, f"--set-{name}-mode={value}")


def read_staged_settings(
    sources: Sequence[SettingsSource], bdf: str, bound_to: BoundTo
) -> StagedSettings:
    """Current and pending values from every source that can read with the GPU bound to
    ``bound_to``."""
    settings: list[SettingState] = []
    unsupported: list[SettingName] = []
    for source in sources:
        if source.bound_to == bound_to:
            states, missing = source.read(bdf)
            settings.extend(states)
            unsupported.extend(missing)
    return StagedSettings(bdf=bdf, settings=settings, unsupported=unsupported)


def restore_operator_defaults(
    sources: Sequence[SettingsSource], staged: StagedSettings, defaults: OperatorDefaults
) -> list[SettingName]:
    """Stage the default of every setting whose current or pending value differs; returns
    what was staged. A reset must follow for ``staged.needs_reset(defaults)``."""
    changed: list[SettingName] = []
    by_name = {name: source for source in sources for name in source.names}
    for state in staged.settings:
        wanted = defaults.value(state.name)
        if not state.is_at(wanted):
            # Staged even when only the current value differs: a tenant may have staged the
            # default back while running with its own, and staging twice is harmless.
            by_name[state.name].stage(staged.bdf, state.name, wanted)
            changed.append(state.name)
    return changed


def verify_settings(staged: StagedSettings, defaults: OperatorDefaults) -> None:
    """Raise DeviceError (``reason="settings_mismatch"``) unless every setting, current and
    pending, is the operator's default. The handoff quarantines on it."""
    mismatches = staged.mismatches(defaults)
    if mismatches:
        raise DeviceError(
            f"GPU {staged.bdf} is not at the operator's settings after the handoff: "
            + "; ".join(mismatches),
            bdf=staged.bdf,
            reason="settings_mismatch",
            mismatches=mismatches,
            retry=False,
        )
