"""The host as a network client: a tenant names the registry, so a pull must not reach the
host itself, follow a redirect to plain HTTP, or tell the tenant what answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hangar.errors import ImageError
from hangar.images.netpolicy import RegistryPolicy
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import ImageCache
from tests.fixtures.hostile import (
    Answer,
    drip,
    http_service,
    make_ca,
    raw_garbage,
    tcp_service,
)

SECRET = b"INTERNAL-SECRET-0451"


def pull_error(cache: ImageCache, reference: str) -> ImageError:
    with pytest.raises(ImageError) as raised:
        asyncio.run(cache.ensure(parse_image_ref(reference)))
    return raised.value


def secret_page(_path: str) -> Answer:
    return 200, {"Content-Type": "text/plain"}, SECRET


def test_registries_on_this_host_are_refused_by_default(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    with http_service(secret_page) as internal:
        error = pull_error(cache, f"{internal.authority}/app:latest")
        assert error.fields["reason"] == "address_refused"
        assert "loopback" in str(error)
        assert internal.paths == [], "nothing was sent to it"
    error = pull_error(cache, "localhost:1/app:latest")
    assert error.fields["reason"] == "address_refused"


def test_a_port_scan_learns_nothing(tmp_path: Path) -> None:
    """A closed port, a raw TCP listener and an HTTP service on this host all get the same
    answer; allowed explicitly, they are still told apart by a fixed reason only."""
    with (
        http_service(secret_page) as web,
        tcp_service(raw_garbage) as raw,
        tcp_service(raw_garbage) as closed_later,
    ):
        closed = closed_later.authority
    with http_service(secret_page) as web, tcp_service(raw_garbage) as raw:
        targets = [web.authority, raw.authority, closed]
        refused = {
            str(pull_error(ImageCache(tmp_path), f"{t}/app:latest")).replace(t, "HOST")
            for t in targets
        }
        assert len(refused) == 1, refused
        allowed = RegistryPolicy(local=frozenset(targets), insecure=frozenset(targets))
        cache = ImageCache(tmp_path, policy=allowed)
        for target in targets:
            error = pull_error(cache, f"{target}/app:latest")
            assert SECRET.decode() not in str(error) and "INTERNAL-BANNER" not in str(error)
            assert "SSH" not in str(error.fields)
            assert error.fields["reason"] in ("unreachable", "bad_image", "not_found")
        raw_error = pull_error(cache, f"{raw.authority}/app:latest")
        closed_error = pull_error(cache, f"{closed}/app:latest")
        assert raw_error.fields["reason"] == closed_error.fields["reason"] == "unreachable"


def test_a_redirect_from_https_to_http_or_to_this_host_is_not_followed(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    with http_service(secret_page) as internal:

        def to_plain_http(path: str) -> Answer:
            return 307, {"Location": f"http://{internal.authority}/v2/"}, b""

        def to_https_on_this_host(path: str) -> Answer:
            return 302, {"Location": f"https://localhost:{internal.port}/v2/"}, b""

        with (
            http_service(to_plain_http, tls=ca) as downgrading,
            http_service(to_https_on_this_host, tls=ca) as inward,
        ):
            # The test allows its own TLS registries explicitly (they are on loopback too).
            policy = RegistryPolicy(
                local=frozenset({downgrading.authority, inward.authority}), tls=ca.client_context
            )
            cache = ImageCache(tmp_path, policy=policy)
            downgraded = pull_error(cache, f"{downgrading.authority}/app:latest")
            assert downgraded.fields["reason"] == "redirect_refused"
            redirected_in = pull_error(cache, f"{inward.authority}/app:latest")
            assert redirected_in.fields["reason"] == "address_refused"
            assert downgrading.paths and inward.paths
        assert internal.paths == [], "the internal service never saw a request"
        for error in (downgraded, redirected_in):
            assert SECRET.decode() not in str(error) and SECRET.decode() not in str(error.fields)


def test_a_tarpit_registry_is_given_up_at_the_pull_deadline(tmp_path: Path) -> None:
    from hangar.images.rootfs import ImageLimits

    with tcp_service(drip) as tarpit:
        policy = RegistryPolicy(
            local=frozenset({tarpit.authority}), insecure=frozenset({tarpit.authority})
        )
        cache = ImageCache(tmp_path, policy=policy, limits=ImageLimits(pull_timeout_s=2.0))
        error = pull_error(cache, f"{tarpit.authority}/app:latest")
    assert error.fields["reason"] == "too_slow"
    assert cache.workers.running() == {}


def test_names_resolving_to_this_hosts_addresses_are_refused() -> None:
    import ipaddress

    own = ipaddress.ip_address("192.0.2.10")
    names = {
        "mine.test": [own],
        "metadata.test": [ipaddress.ip_address("169.254.169.254")],
        "mapped.test": [ipaddress.ip_address("::ffff:127.0.0.1")],
        "elsewhere.test": [ipaddress.ip_address("198.51.100.7")],
    }
    policy = RegistryPolicy(resolver=lambda host, _port: names[host], own_addresses=lambda: {own})
    for name, kind in (
        ("mine.test", "own address"),
        ("metadata.test", "link-local"),
        ("mapped.test", "loopback"),
    ):
        with pytest.raises(ImageError) as raised:
            policy.addresses(name, 443)
        assert kind in str(raised.value)
    assert policy.addresses("elsewhere.test", 443) == names["elsewhere.test"]
    allowed = RegistryPolicy(
        local=frozenset({"mine.test:5000"}),
        resolver=lambda host, _port: names[host],
        own_addresses=lambda: {own},
    )
    assert allowed.addresses("mine.test:5000", 443) == [own]
