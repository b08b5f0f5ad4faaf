"""An API replica's guest platform: every operation of the protocol is refused with a
clear error, every question about a guest says there is none."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from hangar.agent.platform import GuestPlatform
from hangar.errors import Unprocessable
from hangar.fleet.replica import NoGuests

OPERATIONS = sorted(
    name
    for name, member in vars(GuestPlatform).items()
    if not name.startswith("_") and callable(member)
)


def test_the_protocol_has_operations() -> None:
    assert {"launch", "resume", "suspend", "exec", "alive"} <= set(OPERATIONS)


@pytest.mark.parametrize("name", OPERATIONS)
async def test_each_operation_refuses_or_answers_none(name: str) -> None:
    call = getattr(NoGuests(), name)
    assert inspect.iscoroutinefunction(call) == inspect.iscoroutinefunction(
        getattr(GuestPlatform, name)
    )

    async def invoke() -> Any:
        result = call("an argument", key="a value")
        return await result if inspect.isawaitable(result) else result

    if name in NoGuests.ANSWERS:
        assert await invoke() == NoGuests.ANSWERS[name]()
    else:
        with pytest.raises(Unprocessable) as caught:
            await invoke()
        assert caught.value.fields["field"] == "host"
        assert name in str(caught.value)


def test_anything_else_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        NoGuests().not_a_platform_operation  # noqa: B018
    with pytest.raises(AttributeError):
        NoGuests().__wrapped__  # noqa: B018
