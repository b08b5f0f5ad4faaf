"""``hangar bench ...``: benchmarks that print medians and ratios against a baseline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from hangar.bench.placement import placement
from hangar.bench.trace import mixes, replay

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
    """Plain QEMU vs hangar start vs hangar create vs resume of a suspended guest, same
    kernel, initrd and rootfs."""
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


@bench_app.command("volume")
def bench_volume(
    rounds: Annotated[int, typer.Option("--rounds", "-n", min=1, max=50)] = 9,
    image: Annotated[
        str | None, typer.Option(help="Image the guest runs (default: a busybox image built now).")
    ] = None,
    folder: Annotated[
        Path | None,
        typer.Option("--dir", help="Where the disk images go (default: the temporary folder)."),
    ] = None,
) -> None:
    """Guest disk I/O: a raw file vs a hangar volume vs an encrypted one, one QEMU line."""
    from hangar.bench.volume import volume_bench

    typer.echo(volume_bench(rounds, image, folder))


bench_app.command("placement")(placement)
bench_app.command("mixes")(mixes)
bench_app.command("replay")(replay)


@bench_app.command("tenancy")
def bench_tenancy(
    cycles: Annotated[int, typer.Option("--cycles", "-n", min=2, max=50)] = 8,
    image: Annotated[
        str | None, typer.Option(help="Image the measured tenant runs (default: busybox).")
    ] = None,
) -> None:
    """A second tenant's create-start-stop p50/p99 with and without one tenant flooding."""
    from hangar.bench.tenancy import run_tenancy_bench
    from hangar.images.build import build_busybox_image

    with tempfile.TemporaryDirectory(prefix="hangar-bench-") as scratch:
        home = Path(scratch) / "home"
        if image is None:
            layout = Path(scratch) / "image"
            build_busybox_image(layout, "bench", ["sh"], {})
            image = f"oci:{layout}:bench"
        result = run_tenancy_bench(image, cycles, home)
    typer.echo(result.report())


@bench_app.command("proxy")
def bench_proxy(
    connections: Annotated[int, typer.Option("--connections", "-c", min=1, max=1000)] = 32,
    seconds: Annotated[float, typer.Option("--seconds", min=1, max=60)] = 5.0,
    runs: Annotated[int, typer.Option("--runs", "-n", min=1, max=20)] = 3,
    haproxy_threads: Annotated[int, typer.Option("--haproxy-threads", min=1, max=64)] = 1,
    wake_runs: Annotated[int, typer.Option("--wake-runs", min=1, max=50)] = 9,
) -> None:
    """Direct vs HAProxy vs hangar's proxy on one backend in a network namespace (root)."""
    from hangar.bench.proxy import run_proxy_bench

    result = run_proxy_bench(connections, seconds, runs, haproxy_threads, wake_runs)
    typer.echo(result.report())


@bench_app.command("llm")
def bench_llm(
    rounds: Annotated[int, typer.Option("--rounds", "-n", min=1, max=1000)] = 30,
    wake_runs: Annotated[int, typer.Option("--wake-runs", min=1, max=20)] = 3,
) -> None:
    """A model replica directly vs through the gateway (latency, first token), and the first
    token from a stopped replica vs its plain start (root: boots guests)."""
    from hangar.bench.llm import llm_bench

    typer.echo(llm_bench(rounds, wake_runs))


@bench_app.command("api")
def bench_api(
    sizes: Annotated[
        str, typer.Option(help="Fleet sizes to measure at, growing (`100,1000,10000`).")
    ] = "100,1000,10000",
    samples: Annotated[int, typer.Option("--samples", "-n", min=3, max=500)] = 25,
) -> None:
    """Machine create, get and list p50 through the API at each fleet size, one run."""
    from hangar.bench.api import parse_sizes, run_api_bench

    try:
        fleet = parse_sizes(sizes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--sizes") from None
    typer.echo(run_api_bench(fleet, samples).report())
