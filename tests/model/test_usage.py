"""Prices and the arithmetic of usage: seconds inside a window, resource-seconds and cost."""

from __future__ import annotations

import pytest

from hangar.errors import InvalidRequest
from hangar.model.usage import (
    DEFAULT_PRICES,
    PriceTable,
    UsageAmounts,
    UsageInterval,
    UsageSubject,
    group_key,
    unpriced,
)


def gpu_machine(gpus: float = 2.0, kind: str = "l40s") -> UsageInterval:
    return UsageInterval(
        id="m.1.1",
        subject=UsageSubject.MACHINE,
        org="acme",
        app="infer",
        machine_id="m",
        host="h",
        region="local",
        cpu_kind="performance",
        cpus=8,
        memory_mb=32 * 1024,
        gpu_kind=kind,
        gpus=gpus,
        started_at=0.0,
        until=7200.0,
    )


def test_fly_gpu_prices_are_the_default_and_the_operator_replaces_any() -> None:
    assert DEFAULT_PRICES.gpu["l40s"] == 1.25 and DEFAULT_PRICES.gpu["a100-sxm4-80gb"] == 3.50
    table = PriceTable.parse("gpu:h100-sxm=2.99, cpu:performance=0 ,memory_gb=0", DEFAULT_PRICES)
    assert table.gpu["h100-sxm"] == 2.99 and table.gpu["l40s"] == 1.25
    assert table.cpu == {"shared": DEFAULT_PRICES.cpu["shared"], "performance": 0.0}
    assert PriceTable.parse("") == PriceTable()


@pytest.mark.parametrize(
    "text", ["gpu:l40s", "gpu:l40s=-1", "gpu:l40s=abc", "disk=1", "gpu=1", "memory_gb=nan"]
)
def test_a_bad_price_table_names_what_is_wrong(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        PriceTable.parse(text)
    assert caught.value.fields["field"] == "prices"


def test_cost_is_resource_hours_at_the_hourly_prices() -> None:
    prices = PriceTable(gpu={"l40s": 1.25}, cpu={"performance": 0.05}, memory_gb=0.01)
    amounts = UsageAmounts()
    machine = gpu_machine()
    amounts.add(machine, machine.seconds_within(3600.0, 1e9), prices)
    assert amounts.seconds == 3600.0
    assert amounts.gpu_seconds == 7200.0 and amounts.cpu_seconds == 8 * 3600.0
    assert amounts.memory_gb_seconds == 32 * 3600.0
    assert amounts.cost == pytest.approx(2 * 1.25 + 8 * 0.05 + 32 * 0.01)


def test_a_slice_counts_its_fraction_and_unknown_kinds_are_unpriced() -> None:
    prices = PriceTable(gpu={"a100-pcie-40gb": 2.5})
    half = gpu_machine(gpus=0.5, kind="a100-pcie-40gb")
    amounts = UsageAmounts()
    amounts.add(half, 3600.0, prices)
    assert amounts.cost == pytest.approx(1.25)
    assert unpriced(gpu_machine(kind="h200"), prices) == ["gpu:h200", "cpu:performance"]
    assert group_key(half, "gpu_kind") == "a100-pcie-40gb"
    assert group_key(half, "machine") == "m" and group_key(half, "app") == "infer"
