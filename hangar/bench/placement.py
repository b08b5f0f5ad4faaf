"""``hangar bench placement``: placement quality on a trace, or placement throughput.

Mounted by the CLI; runnable on its own meanwhile::

    python -m hangar.bench.placement placement \\
        --nodes ../shared/data/alibaba-gpu-v2023/openb_node_list_gpu_node.csv \\
        --pods ../shared/data/alibaba-gpu-v2023/openb_pod_list_default.csv --seeds 42..51
    python -m hangar.bench.placement placement --synthetic-hosts 10000 --machines 100000
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from hangar.scheduler.bench import DEFAULT_POLICIES, run_throughput_bench, run_trace_bench
from hangar.scheduler.claims import ClaimStore, InMemoryClaimStore
from hangar.scheduler.model import HostState

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


if __name__ == "__main__":
    app()
