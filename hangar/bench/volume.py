"""``hangar bench volume``: guest disk I/O on hangar volumes against a plain raw file.

One guest (QEMU as hangar's driver runs it, hangar's kernel and init) gets three disks of
the same size on one command line:

(a) a plain sparse raw file attached by hand (``-drive format=raw``), the baseline;
(b) a hangar volume (qcow2, attached by :meth:`VolumeHost.attachment`);
(c) an encrypted hangar volume (qcow2 with QEMU's LUKS).

Inside the guest ``hangar-dio`` (``dio.c``, built static here) runs four measures on each
disk's block device with O_DIRECT, so the guest's page cache is not measured: sequential
write and read in 1 MiB blocks, random 4 KiB write and read; writes end with fdatasync,
which reaches the host's drive. Reads come from the host's page cache for all three alike
(QEMU's default cache mode), so they compare the disk formats and QEMU's block layer. Each
measure runs on the three disks back to back in rotating order; each figure is the median
over rounds; b/a and c/a are, per measure, the median over rounds of the ratio to the raw
file within the round, and a ratio line is their geometric mean over the four measures.
``--dir`` picks the filesystem the three images live on (named in the report).
"""

from __future__ import annotations

import asyncio
import base64
import math
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hangar.bench.guest import GuestKit, GuestResult, OneOffGuest
from hangar.errors import HangarError
from hangar.images.build import build_busybox_image
from hangar.images.run_config import GuestFile
from hangar.images.runner import run_command
from hangar.settings import Settings
from hangar.volumes.host import VolumeHost
from hangar.volumes.model import GIB, VolumeSpec, new_volume_id
from hangar.volumes.settings import VolumeSettings

DIO_SOURCE = Path(__file__).with_name("dio.c")
DIO_GUEST_PATH = "/usr/local/bin/hangar-dio"
DISKS = ("raw", "volume", "encrypted")
MIB = 1 << 20
SEQ_BLOCK = MIB
RANDOM_BLOCK = 4096
SPAN_BYTES = 64 * MIB
RANDOM_COUNT = 1024
BENCH_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    block: int
    count: int
    per_op: bool
    """Shown as operations a second (random) rather than MB/s (sequential)."""


MEASURES = (
    Measure("seqwrite", "seq write 1 MiB", SEQ_BLOCK, SPAN_BYTES // SEQ_BLOCK, False),
    Measure("seqread", "seq read 1 MiB", SEQ_BLOCK, SPAN_BYTES // SEQ_BLOCK, False),
    Measure("randwrite", "rand write 4 KiB", RANDOM_BLOCK, RANDOM_COUNT, True),
    Measure("randread", "rand read 4 KiB", RANDOM_BLOCK, RANDOM_COUNT, True),
)


@dataclass
class VolumeBenchResult:
    rounds: int
    # disk -> measure key -> bytes a second, one sample a round
    samples: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {disk: {m.key: [] for m in MEASURES} for disk in DISKS}
    )

    def median(self, disk: str, measure: Measure) -> float:
        return statistics.median(self.samples[disk][measure.key])

    def measure_ratio(self, disk: str, measure: Measure) -> float:
        """Median over rounds of ``disk`` / raw within each round: the three ran back to
        back, so a change in the host's load between rounds cancels out."""
        pairs = zip(self.samples[disk][measure.key], self.samples["raw"][measure.key], strict=True)
        return statistics.median(value / raw for value, raw in pairs)

    def ratio(self, disk: str) -> float:
        """Geometric mean over the four measures of :meth:`measure_ratio`."""
        logs = [math.log(self.measure_ratio(disk, m)) for m in MEASURES]
        return math.exp(sum(logs) / len(logs))

    def _shown(self, disk: str, measure: Measure) -> str:
        value = self.median(disk, measure)
        if measure.per_op:
            return f"{value / measure.block:9.0f} IOPS"
        return f"{value / MIB:8.1f} MB/s"

    def report(self) -> str:
        lines = [
            f"guest disk I/O, O_DIRECT, {self.rounds} rounds, medians "
            f"(seq: {SPAN_BYTES // MIB} MiB in 1 MiB blocks; random: {RANDOM_COUNT} x 4 KiB "
            f"within {SPAN_BYTES // MIB} MiB)",
            f"{'measure':<18} {'(a) raw file':>14} {'(b) volume':>14} {'(c) encrypted':>14}"
            f" {'b/a':>6} {'c/a':>6}",
        ]
        for measure in MEASURES:
            lines.append(
                f"{measure.label:<18} {self._shown('raw', measure):>14} "
                f"{self._shown('volume', measure):>14} {self._shown('encrypted', measure):>14} "
                f"{self.measure_ratio('volume', measure):6.2f} "
                f"{self.measure_ratio('encrypted', measure):6.2f}"
            )
        lines.append(f"ratio volume/raw: {self.ratio('volume'):.2f}")
        lines.append(f"ratio encrypted/raw: {self.ratio('encrypted'):.2f}")
        return "\n".join(lines)


def build_dio(dest: Path) -> Path:
    """``hangar-dio``, static, so it runs in any image."""
    run_command(["gcc", "-O2", "-static", "-o", dest, DIO_SOURCE])
    return dest


def guest_script(rounds: int, serials: dict[str, str]) -> str:
    """Make a device node for each disk (the process's /dev is minimal), then the rounds."""
    lines = [
        "set -e",
        "node() { mknod /dev/bench-$1 b $(tr : ' ' < /sys/block/$2/dev); }",
        "for disk in /sys/block/vd*; do",
        "  name=${disk##*/}; serial=$(cat $disk/serial 2>/dev/null || true)",
        '  [ "$name" = vda ] && continue',
        '  case "$serial" in',
        f"    {serials['volume']}) node volume $name ;;",
        f"    {serials['encrypted']}) node encrypted $name ;;",
        "    '') node raw $name ;;",
        "  esac",
        "done",
    ]
    # Each measure runs on the three disks back to back, their order rotating, so that a
    # change in the host's load falls on all three alike.
    turn = 0
    for round_number in range(1, rounds + 1):
        for measure in MEASURES:
            turn += 1
            shift = turn % len(DISKS)
            for disk in DISKS[shift:] + DISKS[:shift]:
                lines.append(
                    f"echo bench {round_number} {disk} $(hangar-dio {measure.key} "
                    f"/dev/bench-{disk} {measure.block} {measure.count} {SPAN_BYTES} "
                    f"{round_number})"
                )
    return "\n".join(lines)


def parse_samples(result: GuestResult, rounds: int) -> VolumeBenchResult:
    bench = VolumeBenchResult(rounds)
    for line in result.output():
        words = line.split()
        if len(words) == 6 and words[0] == "bench":
            _, _, disk, key, size, micros = words
            bench.samples[disk][key].append(int(size) / (int(micros) / 1e6))
    missing = [
        f"{disk} {m.key}" for disk in DISKS for m in MEASURES if not bench.samples[disk][m.key]
    ]
    if missing or result.exit_code != 0:
        tail = "\n".join(result.console.splitlines()[-20:])
        raise HangarError(f"the benchmark guest failed ({', '.join(missing)}):\n{tail}")
    return bench


async def run_volume_bench(
    rounds: int, scratch: Path, image: str | None = None
) -> VolumeBenchResult:
    if image is None:
        layout = scratch / "image"
        build_busybox_image(layout, "bench", ["sh"], {})
        image = f"oci:{layout}:bench"
    kit = await GuestKit.prepare(Settings().cache_dir, image)
    dio = build_dio(scratch / "hangar-dio")
    host = VolumeHost(VolumeSettings(root=scratch / "volumes", reserve_bytes=0))
    volume = VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=False)
    encrypted = VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=True)
    for spec in (volume, encrypted):
        await host.create_plan(spec).execute()
    raw = scratch / "raw.img"
    with raw.open("wb") as sparse:
        sparse.truncate(GIB)
    script = guest_script(rounds, {"volume": volume.id, "encrypted": encrypted.id})
    guest = OneOffGuest(
        kit,
        "bench-volume",
        ["sh", "-c", script],
        attached=[host.attachment(volume.id, "bench"), host.attachment(encrypted.id, "bench")],
        raw_disks=[raw],
        files=[
            GuestFile(
                guest_path=DIO_GUEST_PATH,
                raw_value=base64.b64encode(dio.read_bytes()).decode(),
                mode=0o755,
            )
        ],
    )
    return parse_samples(await guest.run(BENCH_TIMEOUT_S), rounds)


def volume_bench(rounds: int, image: str | None = None, folder: Path | None = None) -> str:
    """Run the benchmark with its images in a scratch folder under ``folder`` (default: the
    system's temporary folder) and return the report."""
    scratch = Path(tempfile.mkdtemp(prefix="hangar-bench-volume-", dir=folder))
    try:
        result = asyncio.run(run_volume_bench(rounds, scratch, image))
        filesystem = run_command(["df", "--output=fstype", scratch]).split()[-1]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return f"images on {filesystem} ({scratch.parent})\n{result.report()}"
