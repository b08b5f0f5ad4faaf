"""``hangar bench placement``: placement quality on a trace, or placement throughput.

Mounted by the CLI; runnable on its own meanwhile::

    python -m hangar.bench.placement placement \\
        --nodes ../shared/data/alibaba-gpu-v2023/openb_node_list_gpu_node.csv \\
        --pods ../shared/data/alibaba-gpu-v2023/openb_pod_list_default.csv --seeds 42..51
    python -m hangar.bench.placement placement --synthetic-hosts 10000 --machines 100000
    python -m hangar.bench.placement placement --etcd-cluster 3 --machines 100000

With ``--etcd URL[,URL...]`` (or ``--etcd-cluster N``: a local cluster of N members started for
the run) schedulers in separate processes race through etcd, and the single-process SQLite
figure is measured in the same run; the rates end the output, one a line.
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


def claim_store_factory(kind: str, scratch: Path) -> Callable[[list[HostState]], ClaimStore]:
    """The bench's claim store; a SQLite one keeps its database in ``scratch``."""
    if kind == "memory":
        return InMemoryClaimStore
    if kind != "sqlite":
        raise typer.BadParameter("--store is 'sqlite' or 'memory'")

    def sqlite_store(hosts: list[HostState]) -> ClaimStore:
        from hangar.store.host_claims import SqliteClaimStore

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
    etcd: Annotated[
        str | None,
        typer.Option(help="Race schedulers through this etcd (client URLs, comma-separated)."),
    ] = None,
    etcd_cluster: Annotated[
        int | None,
        typer.Option(min=1, help="Race through a local etcd of this many members (started here)."),
    ] = None,
    schedulers: Annotated[
        int, typer.Option(min=1, help="etcd mode: scheduler processes racing.")
    ] = 2,
    batch: Annotated[
        int,
        typer.Option(min=1, max=128, help="etcd mode: placements per transaction (1: one each)."),
    ] = 64,
    refresh_every: Annotated[
        int, typer.Option(min=0, help="etcd mode: requests between index refreshes (0: never).")
    ] = 10_000,
) -> None:
    """Allocation ratio on a trace (FGD paper's method), or placements per second."""
    if etcd is not None or etcd_cluster is not None:
        _etcd_race(
            etcd,
            etcd_cluster,
            synthetic_hosts or 10_000,
            machines,
            schedulers=schedulers,
            batch=batch,
            refresh_every=refresh_every,
            as_json=as_json,
        )
        return
    if synthetic_hosts is not None:
        with tempfile.TemporaryDirectory(prefix="hangar-bench-claims-") as scratch:
            throughput = run_throughput_bench(
                synthetic_hosts, machines, store_factory=claim_store_factory(store, Path(scratch))
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


def _etcd_race(
    endpoints: str | None,
    members: int | None,
    hosts: int,
    machines: int,
    *,
    schedulers: int,
    batch: int,
    refresh_every: int,
    as_json: bool,
) -> None:
    from hangar.errors import HangarError, InvalidRequest
    from hangar.store.etcd.bench import run_etcd_race_bench
    from hangar.store.etcd.client import parse_endpoints
    from hangar.store.etcd.local import LocalEtcdCluster

    if endpoints is not None and members is not None:
        raise typer.BadParameter("give --etcd or --etcd-cluster, not both")
    given: list[str] = []
    if endpoints is not None:
        try:
            given = [endpoint.url for endpoint in parse_endpoints(endpoints)]
        except InvalidRequest as error:
            raise typer.BadParameter(error.message, param_hint="--etcd") from None
    cluster = LocalEtcdCluster(members).start() if members is not None else None
    try:
        urls = cluster.endpoints if cluster is not None else given
        print(f"racing {schedulers} schedulers through etcd {','.join(urls)} ...", file=sys.stderr)
        raced = run_etcd_race_bench(
            urls,
            hosts,
            machines,
            schedulers=schedulers,
            batch=batch,
            refresh_every=refresh_every,
            server_cpu=cluster.cpu_seconds if cluster is not None else None,
        )
    except HangarError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        if cluster is not None:
            cluster.close()
    print("single-process SQLite, same fleet and requests ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="hangar-bench-claims-") as scratch:
        alone = run_throughput_bench(
            hosts, machines, store_factory=claim_store_factory("sqlite", Path(scratch))
        )
    ratio = raced.placements_per_s / alone.placements_per_s if alone.placements_per_s else 0.0
    if as_json:
        typer.echo(json.dumps({"etcd": raced.to_json(), "sqlite": alone.to_json(), "ratio": ratio}))
        return
    typer.echo(raced.summary())
    typer.echo(f"sqlite (one process): {alone.summary()}")
    typer.echo(f"placements/s etcd: {raced.placements_per_s:.0f}")
    typer.echo(f"placements/s sqlite: {alone.placements_per_s:.0f}")
    typer.echo(f"ratio etcd/sqlite: {ratio:.2f}")


if __name__ == "__main__":
    app()
