"""``hangar bench ...``: benchmarks that print medians and ratios against a baseline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from hangar.scheduler.bench_cli import mixes, placement, replay

bench_app = typer.Typer(
    help="Benchmarks (medians and ratios against a baseline).", no_args_is_help=True
)


@bench_app.command("boot")
def bench_boot(
    runs: Annotated[int, typer.Option("--runs", "-n", min=1, max=50)] = 5,
    image: Annotated[
        str | None, typer.Option(help="Image to boot (default: a busybox image built now).")
    ] = None,
) -> None:
    """Plain QEMU vs hangar start vs hangar create, same kernel, initrd and rootfs."""
    from hangar.bench.boot import run_boot_bench
    from hangar.images.build import build_busybox_image

    with tempfile.TemporaryDirectory(prefix="hangar-bench-") as scratch:
        home = Path(scratch) / "home"
        if image is None:
            layout = Path(scratch) / "image"
            build_busybox_image(layout, "bench", ["sh"], {})
            image = f"oci:{layout}:bench"
        result = run_boot_bench(image, runs, home)
    typer.echo(result.report())


bench_app.command("placement")(placement)
bench_app.command("mixes")(mixes)
bench_app.command("replay")(replay)
