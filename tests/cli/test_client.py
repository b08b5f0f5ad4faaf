"""The CLI's client against a server with Fly's default rate limits: it waits 429s out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.cli.client import ApiError, HangarClient
from hangar.server_process import ServerProcess
from hangar.settings import Settings

CALLS = 6
BURST, PER_SECOND = 3, 1.0


@pytest.fixture(scope="module")
def fly_limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("fly-limits"), {"HANGAR_RATE_LIMITS": "default=1/3"}
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.remove_network()


@pytest.mark.slow
def test_the_client_waits_out_rate_limits(fly_limited_server: ServerProcess) -> None:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    client = HangarClient(
        fly_limited_server.url, token=fly_limited_server.operator_token, sleep=sleep
    )
    client.create_app("web")
    started = time.monotonic()
    for _ in range(CALLS):
        with pytest.raises(ApiError) as refused:
            client.machine_action("web", "0123456789abcd", "stop")
        assert refused.value.status_code == 404
    elapsed = time.monotonic() - started
    # A token bucket lets through at most BURST + PER_SECOND * elapsed calls without a wait.
    assert len(waits) >= CALLS - BURST - int(PER_SECOND * elapsed)
    assert all(0 < wait <= 10 for wait in waits)


def test_without_a_token_it_reads_the_operator_token_file(tmp_path: Path) -> None:
    from hangar.cli.client import default_token

    local = Settings(home=tmp_path, api_url="http://127.0.0.1:4280", api_token=None)
    assert default_token(local) is None
    (tmp_path / "operator.token").write_text("hgr_from_file\n")
    assert default_token(local) == "hgr_from_file"
    assert default_token(local.model_copy(update={"api_url": "http://localhost:9"})) == (
        "hgr_from_file"
    )
    from_env = Settings(home=tmp_path, api_token="hgr_from_env")
    assert default_token(from_env) == "hgr_from_env"


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.5:4280", "https://hangar.example.com", "http://127.0.0.1.example.com:4280"],
)
def test_the_operator_token_file_never_goes_to_another_address(tmp_path: Path, url: str) -> None:
    """A HANGAR_API_URL that points elsewhere gets no token from the local file."""
    from hangar.cli.client import default_token

    (tmp_path / "operator.token").write_text("hgr_from_file\n")
    assert default_token(Settings(home=tmp_path, api_url=url, api_token=None)) is None
