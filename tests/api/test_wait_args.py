"""The wait verb's arguments: states given as flaps sends them, and a bare string refused."""

from __future__ import annotations

import pytest

from hangar.api.services.machines import wait_timeout_s, wanted_states
from hangar.errors import InvalidRequest


def test_states_given_once_twice_or_comma_separated() -> None:
    assert wanted_states(["started"]) == {"started"}
    assert wanted_states(["started", "stopped"]) == {"started", "stopped"}
    assert wanted_states(["started,suspended"]) == {"started", "suspended"}
    assert wanted_states([]) == {"started"}


def test_an_unknown_state_names_the_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        wanted_states(["sleeping"])
    assert caught.value.fields["field"] == "state"


def test_a_bare_string_is_a_callers_mistake_not_a_list_of_letters() -> None:
    with pytest.raises(TypeError, match="not the string 'started'"):
        wanted_states("started")


def test_timeout_in_seconds_or_as_a_duration() -> None:
    assert wait_timeout_s(None) == wait_timeout_s("60")
    assert wait_timeout_s("30") == 30
    assert wait_timeout_s("1m0s") == 60
    with pytest.raises(InvalidRequest):
        wait_timeout_s("0")
