"""Real guests that write too much: root in a guest floods its control port, a chatty guest
its console. The host keeps bounded files, logs the flood once, still records the exit, and
``logs`` streams what is kept; following a machine that never starts ends."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hangar.model.guest_contract import Port, RunDir
from hangar.vmm.channels import previous_console_log
from tests.agent.helpers import machine_path, run_machine, wait_exit_recorded
from tests.api.helpers import unique, wait_runs_finished
from tests.fixtures.inprocess import InProcessServer

KIB = 1024
MIB = 1024 * KIB
CONSOLE_CAP = 256 * KIB
# Root in the guest makes itself a node for the control port (the process's /dev has none).
FIND_CTL_PORT = (
    "for p in /sys/class/virtio-ports/*; do "
    f'[ "$(cat $p/name)" = {Port.CONTROL} ] && dev=$(cat $p/dev); done; '
    "mknod /tmp/ctl c ${dev%:*} ${dev#*:}; port=/tmp/ctl; "
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    home = tmp_path_factory.mktemp("channels")
    with InProcessServer(
        home, console_log_max_bytes=CONSOLE_CAP, guest_channel_rate=4 * MIB
    ) as running:
        yield running


@pytest.fixture
def api(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        app = unique("chan")
        assert client.post("/v1/apps", json={"app_name": app}).status_code == 201
        client.headers["x-test-app"] = app
        yield client


def test_a_control_port_flood_is_bounded_and_the_exit_still_recorded(
    server: InProcessServer,
    api: httpx.Client,
    test_image: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = api.headers["x-test-app"]
    script = (
        FIND_CTL_PORT + "head -c 8388608 /dev/zero | tr '\\000' x > $port; "
        "yes '{\"garbage\": true}' | head -c 4194304 > $port; exit 3"
    )
    with caplog.at_level(logging.WARNING):
        machine_id = run_machine(api, app, test_image, ["sh", "-c", script])
        [exit_event] = wait_exit_recorded(api, app, machine_id)
    assert exit_event["exit_code"] == 3, exit_event
    control_log = server.home / "machines" / machine_id / RunDir.CONTROL_LOG
    assert not control_log.exists() or control_log.stat().st_size < 2 * MIB
    floods = [
        r.getMessage() for r in caplog.records if f"flood from {machine_id}" in r.getMessage()
    ]
    assert len(floods) == 1, floods


def test_the_console_is_capped_and_logs_stream_what_is_kept(
    server: InProcessServer, api: httpx.Client, test_image: str
) -> None:
    app = api.headers["x-test-app"]
    script = "i=0; while [ $i -lt 12000 ]; do echo chatty-line-$i-padding-padding; i=$((i+1)); done"
    machine_id = run_machine(api, app, test_image, ["sh", "-c", script])
    wait_exit_recorded(api, app, machine_id)
    console = server.home / "machines" / machine_id / RunDir.CONSOLE_LOG
    kept = console.stat().st_size + previous_console_log(console).stat().st_size
    assert kept <= CONSOLE_CAP + 64 * KIB
    text = api.get(machine_path(app, machine_id) + "/logs").text
    assert "chatty-line-11999" in text and "chatty-line-0-" not in text
    assert len(text.encode()) == kept


def test_following_a_machine_that_never_starts_ends(api: httpx.Client, test_image: str) -> None:
    app = api.headers["x-test-app"]
    created = api.post(
        f"/v1/apps/{app}/machines", json={"config": {"image": test_image}, "skip_launch": True}
    )
    machine_id = created.json()["id"]
    wait_runs_finished(api, app, machine_id)
    response = api.get(machine_path(app, machine_id) + "/logs", params={"follow": "true"})
    assert response.status_code == 200 and response.text == ""


def test_followers_are_capped_and_time_limited(tmp_path: Path) -> None:
    import asyncio

    from hangar.api.console import ConsoleReaders
    from hangar.clock import ManualClock
    from hangar.errors import RateLimited

    clock = ManualClock()
    readers = ConsoleReaders(clock, follow_max_s=60, max_followers=2)
    log = tmp_path / "console.log"
    log.write_bytes(b"booting\n")
    slots = [readers.take("m1"), readers.take("m1")]
    with pytest.raises(RateLimited):
        readers.take("m1")

    async def follow_forever_running_machine() -> bytes:
        stream = readers.follow(log, lambda: True, slots[0])
        task = asyncio.ensure_future(_collect(stream))
        for _ in range(5):
            await asyncio.sleep(0)
            clock.advance(30)
        return await asyncio.wait_for(task, 30)

    assert asyncio.run(follow_forever_running_machine()) == b"booting\n"
    assert readers.followers("m1") == 1, "the ended follower gave its place back"
    slots[1].release()
    slots[1].release()
    assert readers.followers("m1") == 0


async def _collect(stream: object) -> bytes:
    chunks = [chunk async for chunk in stream]  # type: ignore[attr-defined]
    return b"".join(chunks)
