"""``hangar bench mixes`` and ``hangar bench replay``: placement on every kind of mix built from
the trace's lists, and the trace replayed with arrivals and departures (Fly-style against hangar).

Mounted by the CLI (``hangar bench ...``); runnable on its own too::

    python -m hangar.bench.trace mixes --data ../shared/data/alibaba-gpu-v2023
    python -m hangar.bench.trace replay --data ../shared/data/alibaba-gpu-v2023
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from hangar.bench.placement import parse_seeds
from hangar.errors import InvalidRequest
from hangar.scheduler.bench import MIX_POLICIES, run_mix_bench
from hangar.scheduler.mig import parse_layout
from hangar.scheduler.mixes import FULL_GRID, QUICK_GRID, MixSpec, build_mix
from hangar.scheduler.replay import ReplayConfig
from hangar.scheduler.replay_bench import run_replay_bench
from hangar.scheduler.trace import load_pods

app = typer.Typer(
    help="Placement on the trace's mixes, and the trace replayed.", no_args_is_help=True
)


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


app.command("mixes")(mixes)
app.command("replay")(replay)

if __name__ == "__main__":
    app()
