"""``hangar bench placement --etcd``: schedulers in processes racing through a real etcd, checked
for double claims, with the SQLite figure and the rates on lines of their own."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from hangar.bench.placement import app
from hangar.localhost import free_port
from hangar.store.etcd.bench import run_etcd_race_bench
from hangar.store.etcd.client import EtcdClient
from hangar.store.etcd.local import LocalEtcdCluster


def test_racing_schedulers_place_every_request_once(etcd_cluster: LocalEtcdCluster) -> None:
    result = run_etcd_race_bench(
        etcd_cluster.endpoints,
        hosts=60,
        machines=1200,
        batch=16,
        refresh_every=200,
        server_cpu=etcd_cluster.cpu_seconds,
    )
    assert len(result.workers) == 2
    assert all(worker.requests == 600 for worker in result.workers)
    errors = sum(sum(worker.errors.values()) for worker in result.workers)
    assert result.placed + result.rejected + errors == 1200
    assert result.placed > 600 and result.rejected > 0, "the fleet fills up"
    assert result.double_claims == 0 and result.unaccounted_claims == 0
    assert result.placements_per_s > 0
    assert result.server_cpu_seconds is not None and result.server_cpu_seconds > 0
    assert f"double claims: {result.double_claims}" in result.summary()
    client = EtcdClient(etcd_cluster.endpoints)
    leftovers = [kv.key for kv in client.range_prefix("/hangar-bench-").kvs]
    client.close()
    assert leftovers == [], "the bench removes its fleet"


def test_one_scheduler_without_batching_places_one_transaction_at_a_time(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    result = run_etcd_race_bench(
        etcd_cluster.endpoints, hosts=20, machines=150, schedulers=1, batch=1
    )
    assert result.placed + result.rejected == 150
    assert result.conflicts == 0, "alone, a scheduler never loses a race"
    assert result.double_claims == 0


def test_cli_starts_its_own_etcd_and_prints_the_rates() -> None:
    result = CliRunner().invoke(
        app,
        [
            "placement",
            "--etcd-cluster",
            "1",
            "--synthetic-hosts",
            "40",
            "--machines",
            "300",
            "--batch",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"placements/s etcd: \d+", lines[-3])
    assert re.fullmatch(r"placements/s sqlite: \d+", lines[-2])
    assert re.fullmatch(r"ratio etcd/sqlite: \d+\.\d\d", lines[-1])
    assert "double claims: 0;" in result.stdout
    assert re.search(r"cpu per request: schedulers \d+ us, etcd \d+ us", result.stdout)


def test_cli_refuses_both_etcd_options_and_bad_urls() -> None:
    both = CliRunner().invoke(
        app, ["placement", "--etcd", "http://127.0.0.1:1", "--etcd-cluster", "1"]
    )
    assert both.exit_code != 0 and "not both" in both.output
    bad = CliRunner().invoke(app, ["placement", "--etcd", "ftp://127.0.0.1:1"])
    assert bad.exit_code == 2 and "http://HOST:PORT" in bad.output


def test_cli_says_when_etcd_cannot_be_reached() -> None:
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(
        app, ["placement", "--etcd", f"http://127.0.0.1:{port}", "--machines", "10"]
    )
    assert result.exit_code == 1
    assert "etcd is unavailable" in result.output
