"""The relay's credential and error passing, without a fleet: a manual clock moves time (no
sleeping), real keys derived from a real sealing key."""

from __future__ import annotations

import json
import secrets

import pytest

from hangar.clock import ManualClock
from hangar.errors import (
    Conflict,
    HangarError,
    PreconditionFailed,
    RateLimited,
    ServiceUnavailable,
    Unauthenticated,
    Unprocessable,
)
from hangar.fleet.relay import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    RelayCredential,
    answered_error,
    relayed_error_response,
)
from hangar.store.etcd.sealed import KEY_BYTES, Sealer

TARGET = "/relay/v1/apps/demo/machines/abc/exec?x=1"
BODY = b'{"command": ["echo", "hi"]}'


def fleet_key() -> Sealer:
    return Sealer([secrets.token_bytes(KEY_BYTES)])


def pair(
    clock: ManualClock, sealer: Sealer | None = None
) -> tuple[RelayCredential, RelayCredential]:
    """A replica's credential and an agent's, from the same fleet key."""
    sealer = sealer or fleet_key()
    return RelayCredential.of(sealer, clock), RelayCredential.of(sealer, clock)


def test_a_signed_request_is_accepted_once() -> None:
    clock = ManualClock()
    replica, agent = pair(clock)
    headers = replica.sign("POST", TARGET, BODY)
    agent.check("POST", TARGET, BODY, headers)
    with pytest.raises(Unauthenticated, match="already used"):
        agent.check("POST", TARGET, BODY, headers)


def test_the_key_is_never_sent_and_is_not_the_sealing_key() -> None:
    sealer = fleet_key()
    [derived] = sealer.derived_keys("relay credential")
    assert len(derived) == KEY_BYTES
    assert derived != sealer.derived_keys("something else")[0]
    headers = RelayCredential.of(sealer, ManualClock()).sign("GET", TARGET, b"")
    assert all(derived.hex() not in value for value in headers.values())


@pytest.mark.parametrize("missing", [TIME_HEADER, NONCE_HEADER, SIGNATURE_HEADER])
def test_a_missing_part_is_refused(missing: str) -> None:
    clock = ManualClock()
    replica, agent = pair(clock)
    headers = replica.sign("POST", TARGET, BODY)
    del headers[missing]
    with pytest.raises(Unauthenticated, match="no credential") as caught:
        agent.check("POST", TARGET, BODY, headers)
    assert caught.value.http_status == 401


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("GET", TARGET, BODY),
        ("POST", TARGET.replace("abc", "abd"), BODY),
        ("POST", TARGET + "&y=2", BODY),
        ("POST", TARGET, BODY + b" "),
    ],
)
def test_anything_changed_is_refused(method: str, target: str, body: bytes) -> None:
    clock = ManualClock()
    replica, agent = pair(clock)
    headers = replica.sign("POST", TARGET, BODY)
    with pytest.raises(Unauthenticated, match="does not match"):
        agent.check(method, target, body, headers)


def test_a_forged_signature_or_another_key_is_refused() -> None:
    clock = ManualClock()
    replica, agent = pair(clock)
    forged = {**replica.sign("POST", TARGET, BODY), SIGNATURE_HEADER: "0" * 64}
    with pytest.raises(Unauthenticated):
        agent.check("POST", TARGET, BODY, forged)
    stranger = RelayCredential.of(fleet_key(), clock)
    with pytest.raises(Unauthenticated, match="does not match"):
        agent.check("POST", TARGET, BODY, stranger.sign("POST", TARGET, BODY))


def test_malformed_timestamps_and_nonces_are_refused() -> None:
    clock = ManualClock()
    replica, agent = pair(clock)
    for change in ({TIME_HEADER: "soon"}, {TIME_HEADER: "nan"}, {NONCE_HEADER: "n" * 65}):
        headers = {**replica.sign("POST", TARGET, BODY), **change}
        with pytest.raises(Unauthenticated):
            agent.check("POST", TARGET, BODY, headers)


def test_the_timestamp_is_bound_to_a_window_either_way() -> None:
    replica_clock, agent_clock = ManualClock(), ManualClock()
    sealer = fleet_key()
    replica = RelayCredential.of(sealer, replica_clock)
    agent = RelayCredential.of(sealer, agent_clock)
    stale = replica.sign("POST", TARGET, BODY)
    agent_clock.advance(agent.max_skew_s + 0.5)
    with pytest.raises(Unauthenticated, match="window"):
        agent.check("POST", TARGET, BODY, stale)
    replica_clock.advance(2 * agent.max_skew_s + 1)  # now ahead of the agent
    with pytest.raises(Unauthenticated, match="window"):
        agent.check("POST", TARGET, BODY, replica.sign("POST", TARGET, BODY))
    replica_clock.advance(-agent.max_skew_s)  # within the window again
    agent.check("POST", TARGET, BODY, replica.sign("POST", TARGET, BODY))


def test_nonces_are_forgotten_after_the_window_and_bounded_within_it() -> None:
    clock = ManualClock()
    sealer = fleet_key()
    replica = RelayCredential.of(sealer, clock)
    agent = RelayCredential(sealer.derived_keys("relay credential"), clock, max_nonces=3)
    for _ in range(3):
        agent.check("GET", TARGET, b"", replica.sign("GET", TARGET, b""))
    with pytest.raises(RateLimited):
        agent.check("GET", TARGET, b"", replica.sign("GET", TARGET, b""))
    clock.advance(agent.max_skew_s + 1)
    agent.check("GET", TARGET, b"", replica.sign("GET", TARGET, b""))  # room again


def test_a_rotating_fleet_key_still_checks_the_old_one() -> None:
    clock = ManualClock()
    old, new = secrets.token_bytes(KEY_BYTES), secrets.token_bytes(KEY_BYTES)
    replica = RelayCredential.of(Sealer([old]), clock)
    agent = RelayCredential.of(Sealer([new, old]), clock)
    agent.check("POST", TARGET, BODY, replica.sign("POST", TARGET, BODY))


@pytest.mark.parametrize(
    "error",
    [
        Unprocessable("config.guest: no", field="config.guest"),
        PreconditionFailed("unable to exec", field="state", state="stopped"),
        Conflict("leased", field="fly-machine-lease-nonce"),
        ServiceUnavailable("guest gone", app="demo", reason="guest_exec", retry_after_s=2.0),
        HangarError("disk on fire", path=object()),
    ],
)
def test_an_error_answered_by_the_host_is_raised_as_it_was(error: HangarError) -> None:
    response = relayed_error_response(error)
    again = answered_error("h1", response.status_code, bytes(response.body))
    assert (again.http_status, again.code, again.message) == (
        error.http_status,
        error.code,
        error.message,
    )
    assert again.retryable == error.retryable
    assert set(again.fields) == set(error.fields)
    assert again.fields.get("field") == error.fields.get("field")
    if "retry_after_s" in error.fields:
        assert response.headers["retry-after"] == "2"


def test_a_refused_credential_is_the_replicas_fault_not_the_callers() -> None:
    body = json.dumps({"error": "relay: credential does not match", "status": "unauthenticated"})
    error = answered_error("h2", 401, body.encode())
    assert error.http_status == 502 and "h2" in error.message and "fleet key" in error.message


def test_a_body_that_is_not_the_relays_is_still_an_error_of_its_status() -> None:
    error = answered_error("h3", 503, b"<html>busy</html>")
    assert error.http_status == 503 and "busy" in error.message
