from __future__ import annotations

import pytest

from hangar.errors import InvalidRequest
from hangar.scheduler import RegionCatalog

KNOWN = {"ord", "iad", "ams", "sjc"}


def test_a_list_keeps_its_order_and_drops_repeats() -> None:
    assert RegionCatalog().expand("iad, ord,iad", KNOWN) == ("iad", "ord")


def test_an_alias_expands_in_its_own_order_to_regions_the_fleet_has() -> None:
    catalog = RegionCatalog({"us": ("sjc", "dfw", "ord")})
    assert catalog.expand("us", KNOWN) == ("sjc", "ord")
    assert catalog.expand("ams,us", KNOWN) == ("ams", "sjc", "ord")


def test_no_expression_means_every_region() -> None:
    assert RegionCatalog().expand(" ", KNOWN) == ("ams", "iad", "ord", "sjc")


def test_an_unknown_region_is_kept_so_capacity_errors_can_name_it() -> None:
    assert RegionCatalog().expand("syd", KNOWN) == ("syd",)


@pytest.mark.parametrize("expression", ["ORD!", "o", "ord,,", "ord;iad"])
def test_malformed_regions_are_rejected(expression: str) -> None:
    with pytest.raises(InvalidRequest):
        RegionCatalog().expand(expression, KNOWN)
