"""The README's curl examples work as written: its HTTP block runs in bash against a server of
its own (every curl made to fail on an HTTP error), with the test image."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from hangar.server_process import ServerProcess
from tests.conftest import REPO_ROOT, running_server

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
BLOCK_AFTER = "The same through HTTP"


def curl_block() -> str:
    text = README.read_text()
    start = text.index("```sh\n", text.index(BLOCK_AFTER)) + len("```sh\n")
    return text[start : text.index("```", start)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("readme-home")) as running:
        yield running


def test_the_http_block_is_curl_against_the_api() -> None:
    block = curl_block()
    assert block.count("curl ") >= 10 and "/suspend" in block and "/exec" in block


def test_the_readme_curl_examples_work_as_written(server: ServerProcess, test_image: str) -> None:
    script = (
        'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; echo; }\n' + curl_block()
    )
    env = {
        **os.environ,
        "HANGAR_HOME": str(server.home),
        "HANGAR_API_URL": server.url,
        "IMAGE": test_image,
    }
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert '"stdout":"s3cret\\n"' in result.stdout, result.stdout
    assert (
        '"state":"suspended"' in result.stdout and '"previous_state":"suspended"' in result.stdout
    )
    with server.client() as api:
        [machine] = api.get("/v1/apps/web/machines", params={"include_deleted": True}).json()
        events = api.get(f"/v1/apps/web/machines/{machine['id']}/events").json()
    assert any(e["type"] == "resume" and e["status"] == "resumed" for e in events)
