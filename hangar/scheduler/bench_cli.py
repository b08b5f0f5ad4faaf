"""``hangar bench placement|mixes|replay``: placement quality on a trace, on every kind of
mix, with arrivals and departures; or placement throughput.

Mounted by the CLI (``hangar bench ...``); runnable on its own too::

    python -m hangar.scheduler.bench_cli placement \\
        --nodes ../shared/data/alibaba-gpu-v2023/openb_node_list_gpu_node.csv \\
        --pods ../shared/data/alibaba-gpu-v2023/openb_pod_list_default.csv --seeds 42..51
    python -m hangar.scheduler.bench_cli placement --synthetic-hosts 10000 --machines 100000
    python -m hangar.scheduler.bench_cli mixes --data ../shared/data/alibaba-gpu-v2023
    python -m hangar.scheduler.bench_cli replay --data ../shared/data/alibaba-gpu-v2023
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from hangar.errors import InvalidRequest
from hangar.scheduler.bench import (
    DEFAULT_POLICIES,
    MIX_POLICIES,
    run_mix_bench,
    run_throughput_bench,
    run_trace_bench,
)
from hangar.scheduler.claims import ClaimStore, InMemoryClaimStore
from hangar.scheduler.mig import parse_layout
from hangar.scheduler.mixes import FULL_GRID, QUICK_GRID, MixSpec, build_mix
from hangar.scheduler.model import HostState
from hangar.scheduler.replay import ReplayConfig
from hangar.scheduler.replay_bench import run_replay_bench
from hangar.scheduler.trace import load_pods

app = typer.Typer(help="Placement benchmarks.", no_args_is_help=True)


@app.callback()
def benchmarks() -> None:
    """Placement benchmarks."""


def parse_seeds(text: str) -> list[int]:
    """``42..51`` (inclusive), ``42,43`` or ``42``."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if ".." in part:
            first, last = (int(bound) for bound in part.split("..", 1))
            if last < first:
                raise typer.BadParameter(f"empty seed range {part}", param_hint="--seeds")
            seeds.extend(range(first, last + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise typer.BadParameter("no seeds", param_hint="--seeds")
    return seeds


def claim_store_factory(kind: str) -> Callable[[list[HostState]], ClaimStore]:
    if kind == "memory":
        return InMemoryClaimStore
    if kind != "sqlite":
        raise typer.BadParameter("--store is 'sqlite' or 'memory'")

    def sqlite_store(hosts: list[HostState]) -> ClaimStore:
        from hangar.store.host_claims import SqliteClaimStore

        scratch = Path(tempfile.mkdtemp(prefix="hangar-bench-claims-"))
        claims = SqliteClaimStore(scratch / "claims.sqlite")
        for host in hosts:
            claims.put_host(host)
        return claims

    return sqlite_store


@app.command("placement")
def placement(
    nodes: Annotated[
        Path | None, typer.Option("--nodes", help="Trace node list (CSV).", exists=True)
    ] = None,
    pods: Annotated[
        Path | None, typer.Option("--pods", help="Trace pod list (CSV).", exists=True)
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds: 42..51, or 42,43.")] = "42..51",
    policies: Annotated[
        str,
        typer.Option(
            help="Comma-separated policies (random, bestfit, gpupacking, dotprod, fgd, hangar)."
        ),
    ] = ",".join(DEFAULT_POLICIES),
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes for the trace runs.")] = 1,
    synthetic_hosts: Annotated[
        int | None,
        typer.Option("--synthetic-hosts", min=1, help="Throughput mode: hosts in the fleet."),
    ] = None,
    machines: Annotated[
        int, typer.Option(min=1, help="Throughput mode: machines to place.")
    ] = 100_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    store: Annotated[
        str, typer.Option(help="Throughput mode: claim store, 'sqlite' (embedded) or 'memory'.")
    ] = "sqlite",
) -> None:
    """Allocation ratio on a trace (FGD paper's method), or placements per second."""
    if synthetic_hosts is not None:
        throughput = run_throughput_bench(
            synthetic_hosts, machines, store_factory=claim_store_factory(store)
        )
        typer.echo(json.dumps(throughput.to_json()) if as_json else throughput.summary())
        return
    if nodes is None or pods is None:
        raise typer.BadParameter("give --nodes and --pods, or --synthetic-hosts")
    result = run_trace_bench(
        nodes,
        pods,
        parse_seeds(seeds),
        [name.strip() for name in policies.split(",") if name.strip()],
        jobs=jobs,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else result.table())


NODE_LIST = "openb_node_list_gpu_node.csv"
ALL_NODE_LIST = "openb_node_list_all_node.csv"
POD_LIST = "openb_pod_list_default.csv"
MULTI_POD_LIST = "openb_pod_list_multigpu50.csv"
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Folder with the trace's lists (alibaba-gpu-v2023); --nodes/--pods override it.",
        exists=True,
        file_okay=False,
    ),
]


def _in_data(data: Path | None, given: Path | None, name: str, option: str) -> Path:
    if given is not None:
        return given
    if data is None:
        raise typer.BadParameter(f"give {option} or --data", param_hint=option)
    path = data / name
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not there", param_hint=option)
    return path


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@app.command("mixes")
def mixes(
    data: DataOption = None,
    nodes: Annotated[
        Path | None, typer.Option("--nodes", help="Node list (default: GPU nodes).", exists=True)
    ] = None,
    pods: Annotated[
        Path | None, typer.Option("--pods", help="Pod list the mixes start from.", exists=True)
    ] = None,
    multi_pods: Annotated[
        Path | None,
        typer.Option("--multi-pods", help="More multi-GPU pods to draw from.", exists=True),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds: 42..51, or 42,43.")] = "42..51",
    policies: Annotated[
        str, typer.Option(help="hangar and the policies to compare it with.")
    ] = ",".join(MIX_POLICIES),
    quick: Annotated[
        bool, typer.Option("--quick", help="Three CPU-, share- and multi-GPU-heavy mixes.")
    ] = False,
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """hangar against FGD and BestFit on mixes built from the lists: CPU-only pods 0.5x..2.5x,
    share pods 40..100 % of GPU pods, multi-GPU pods 20..50 % of GPU demand."""
    nodes_csv = _in_data(data, nodes, NODE_LIST, "--nodes")
    pods_csv = _in_data(data, pods, POD_LIST, "--pods")
    if multi_pods is None and data is not None and (data / MULTI_POD_LIST).is_file():
        multi_pods = data / MULTI_POD_LIST
    try:
        result = run_mix_bench(
            nodes_csv,
            pods_csv,
            QUICK_GRID if quick else FULL_GRID,
            parse_seeds(seeds),
            multi_pods,
            [name.strip() for name in policies.split(",") if name.strip()],
            jobs=jobs,
            progress=_progress,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else result.table())


@app.command("replay")
def replay(
    data: DataOption = None,
    nodes: Annotated[
        Path | None,
        typer.Option("--nodes", help="Node list (default: all nodes, CPU-only too).", exists=True),
    ] = None,
    pods: Annotated[
        Path | None,
        typer.Option("--pods", help="Pod list with creation and deletion times.", exists=True),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds: 42..44, or 42,43.")] = "42..44",
    passes: Annotated[int, typer.Option(min=1, help="Passes over the list's arrivals.")] = 4,
    warmup_passes: Annotated[int, typer.Option(min=0, help="Passes not measured.")] = 2,
    load: Annotated[
        float, typer.Option(min=0.01, help="Offered GPU demand, times the GPU capacity.")
    ] = 1.0,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait at once.")] = 1000,
    max_wait: Annotated[
        float, typer.Option(min=0, help="Seconds a request may wait before it is refused.")
    ] = 3600.0,
    mig_model: Annotated[
        str, typer.Option(help="Trace GPU model taken as the MIG-capable kind.")
    ] = "G3",
    mig_kind: Annotated[str, typer.Option(help="The MIG-capable kind it is taken as.")] = (
        "a100-sxm4-80gb"
    ),
    mig_fraction: Annotated[
        float, typer.Option(min=0, max=1, help="Share of those GPUs set up for MIG.")
    ] = 0.5,
    mig_layout: Annotated[
        str, typer.Option(help="Their MIG layout: 3g.40gb+2g.20gb+1g.10gbx2.")
    ] = "3g.40gb+2g.20gb+1g.10gbx2",
    slice_percent: Annotated[
        float, typer.Option(min=0, max=100, help="% of share asks that ask a MIG slice.")
    ] = 5.0,
    share_percent: Annotated[
        float | None,
        typer.Option(min=0, max=100, help="Replay a mix: share pods as % of GPU pods."),
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes (one seed each).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The trace with arrivals and departures: a Fly-style platform (whole GPUs only) against
    hangar (whole GPUs, MIG slices, time shares) on the same stream; ratio of their
    time-averaged GPU allocation."""
    nodes_csv = _in_data(data, nodes, ALL_NODE_LIST, "--nodes")
    pods_csv = _in_data(data, pods, POD_LIST, "--pods")
    try:
        config = ReplayConfig(
            passes=passes,
            warmup_passes=warmup_passes,
            load=load,
            max_queue=max_queue,
            max_wait_s=max_wait,
            mig_model=mig_model,
            mig_kind=mig_kind,
            mig_fraction=mig_fraction,
            mig_layout=parse_layout(mig_layout),
            slice_percent=slice_percent,
        )
        listed = None
        if share_percent is not None:
            listed = build_mix(load_pods(pods_csv), MixSpec(share_percent=share_percent))
        result = run_replay_bench(
            nodes_csv, pods_csv, parse_seeds(seeds), config, jobs, _progress, listed
        )
    except (ValueError, InvalidRequest) as error:
        raise typer.BadParameter(str(error)) from error
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else result.table())


if __name__ == "__main__":
    app()
