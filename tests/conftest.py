"""Suite-wide fixtures: one shared cache (guest kernel, image rootfs), one registry on loopback,
one test image, and one shared ``hangar server`` for tests that do not restart it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HANGAR_CACHE", str(REPO_ROOT / ".cache"))

from hangar.server_process import ServerProcess  # noqa: E402
from hangar.settings import Settings  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

SUITE_CACHE = Settings().cache_dir
"""The suite's shared cache (guest kernel, initramfs, image rootfs)."""
RUNSC = REPO_ROOT / ".cache" / "runsc" / "bin" / "runsc"
"""gVisor's runsc as ``make runsc`` installs it (the sandbox tier's tests need it)."""
SANDBOX_ENV = {"HANGAR_RUNSC": str(RUNSC)}
TEST_IMAGE_TAG = "test"
TEST_IMAGE_CMD = ["sh", "-c", "echo hello from the test image; exit 0"]
FUZZ_EXAMPLES_DEFAULT = 5
FUZZ_SECONDS_DEFAULT = 300.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=FUZZ_EXAMPLES_DEFAULT,
        help="examples per API operation and generation mode in tests/api/test_fuzz.py",
    )
    parser.addoption(
        "--fly-openapi",
        default=str(REPO_ROOT.parent / "shared" / "fly" / "machines-openapi-2024-01.yaml"),
        help="Fly's description of the Machines API that tests/api/test_fly_conformance.py "
        "holds hangar to (default: ../shared/fly/ beside the repository)",
    )
    parser.addoption(
        "--fuzz-seconds",
        type=float,
        default=FUZZ_SECONDS_DEFAULT,
        help="time after which tests/api/test_fuzz.py starts no new operation (a runaway guard)",
    )


@pytest.fixture(scope="session")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real OCI layout holding a small busybox image tagged ``test``."""
    from hangar.images.build import build_busybox_image

    layout = tmp_path_factory.mktemp("oci") / "layout"
    build_busybox_image(layout, TEST_IMAGE_TAG, TEST_IMAGE_CMD, {"GREETING": "hi"})
    return layout


@pytest.fixture(scope="session")
def test_image(oci_layout: Path) -> str:
    """The test image as an ``oci:`` reference."""
    return f"oci:{oci_layout}:{TEST_IMAGE_TAG}"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of a real docker-registry on loopback."""
    address, stop = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield address
    finally:
        stop()


@pytest.fixture(scope="session")
def registry_image(registry: str, oci_layout: Path) -> str:
    """The test image pushed to the loopback registry; returns its reference."""
    reference = f"{registry}/hangar/test:latest"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{oci_layout}:{TEST_IMAGE_TAG}",
            f"docker://{reference}",
        ],
        check=True,
        capture_output=True,
    )
    return reference


def kill_vmms_under(home: Path, volumes_dir: Path | None = None) -> None:
    """Teardown safety net: no QEMU or sandbox started under ``home`` may outlive the test
    session, nor any volume mounted on the host for one (``volumes_dir``: where its volumes
    live, when not ``home/volumes``)."""
    from hangar.agent.guest import find_vmm_processes
    from hangar.vmm.sandbox import SandboxRuntime, find_shims, kill_shim
    from hangar.vmm.sandbox import state_root_for as sandbox_state_root
    from hangar.volumes.host_mount import HostMounts, state_root_for

    for pid in find_vmm_processes(home / "machines"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in find_shims(home / "machines"):
        kill_shim(pid)
    for runtime in SandboxRuntime:
        # The runtime's state of containers killed above (no `delete` ran for them).
        shutil.rmtree(sandbox_state_root(home / "machines", runtime), ignore_errors=True)
    mounts = HostMounts(state_root_for(volumes_dir or home / "volumes"))
    for volume_id in mounts.owners():
        with contextlib.suppress(Exception):
            mounts.unmount(volume_id)


@contextlib.contextmanager
def running_server(
    home: Path, app: str | None = None, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A ``hangar server`` of its own over ``home`` (with ``app`` created), stopped after,
    with every QEMU it started killed."""
    server = ServerProcess(home, {**SANDBOX_ENV, **(env or {})})
    server.start()
    try:
        if app is not None:
            with server.client() as api:
                assert api.post("/v1/apps", json={"app_name": app}).status_code == 201
        yield server
    finally:
        server.stop()
        kill_vmms_under(home)
        server.remove_network()


@pytest.fixture(scope="session")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, registry: str
) -> Iterator[ServerProcess]:
    env = {"HANGAR_INSECURE_REGISTRIES": registry, "HANGAR_LOCAL_REGISTRIES": registry}
    with running_server(tmp_path_factory.mktemp("hangar-home"), env=env) as server:
        yield server


@pytest.fixture
def api(shared_server: ServerProcess) -> Iterator[httpx.Client]:
    with shared_server.client() as client:
        yield client


@pytest.fixture
def app_name(api: httpx.Client, request: pytest.FixtureRequest) -> str:
    """A fresh app for one test, so tests sharing the server do not see each other's machines."""
    base = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")
    base = "".join(ch for ch in base if ch.isalnum() or ch == "-")[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    response = api.post("/v1/apps", json={"app_name": name, "org_slug": "personal"})
    assert response.status_code == 201, response.text
    return name
