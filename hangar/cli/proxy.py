"""``hangar proxy``: publish apps' service ports on this host (its own process on a fleet host)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Annotated

import typer

from hangar.cli.output import fail
from hangar.errors import HangarError
from hangar.model.duration import parse_duration


def parse_port_map(pairs: list[str]) -> dict[int, int]:
    """``80=8080`` -> {80: 8080}: service port 80 listens on host port 8080."""
    mapping: dict[int, int] = {}
    for pair in pairs:
        service, sep, host = pair.partition("=")
        if not sep or not service.isdigit() or not host.isdigit():
            raise ValueError(f"--port-map takes SERVICE_PORT=HOST_PORT, got {pair!r}")
        if not 1 <= int(service) <= 65535 or not 0 <= int(host) <= 65535:
            raise ValueError(f"--port-map {pair!r}: ports are 1..65535 (host port 0: any)")
        mapping[int(service)] = int(host)
    return mapping


def run_loop(main: object) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


def proxy(
    backends: Annotated[
        Path,
        typer.Option(
            "--backends",
            help="JSON file of machines ({id, app, state, private_ip, config}), re-read on change.",
        ),
    ],
    domain: Annotated[str, typer.Option(help="Apps answer as <app>.<domain>.")] = "localhost",
    bind: Annotated[str, typer.Option(help="Address the listeners bind.")] = "0.0.0.0",
    port_map: Annotated[
        list[str] | None,
        typer.Option("--port-map", help="SERVICE_PORT=HOST_PORT, e.g. 80=8080 (repeatable)."),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where generated TLS certificates are cached.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Operator certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    idle_stop: Annotated[
        str, typer.Option(help="Autostop machines idle this long (Go duration).")
    ] = "5m",
) -> None:
    """Publish the service ports of the machines in a backends file (HTTP by Host, TLS, TCP)."""
    from hangar.proxy.settings import ProxySettings
    from hangar.proxy.standalone import serve_backends_file

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = ProxySettings(
            domain=domain,
            bind_host=bind,
            port_map=parse_port_map(port_map or []),
            state_dir=state_dir,
            tls_cert=tls_cert,
            tls_key=tls_key,
            idle_stop_s=parse_duration(idle_stop),
        )
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(serve_backends_file(backends, settings))
    except HangarError as exc:
        fail(str(exc))
