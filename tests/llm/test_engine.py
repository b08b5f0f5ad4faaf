"""The engine: llama-server built once from the pinned sdist, cached by what decides it, and
packed into an OCI image."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from hangar.errors import EngineError
from hangar.images.oci import read_config
from hangar.images.reference import parse_image_ref
from hangar.images.runner import Argv, CommandError
from hangar.llm.engine import (
    ENGINE_PORT,
    IMAGE_SERVER_PATH,
    LLAMA_CPP_PYTHON_VERSION,
    CpuTarget,
    EngineBinary,
    EngineBuild,
    build_engine_image,
    ensure_llama_server,
    is_static_executable,
)
from tests.conftest import SUITE_CACHE
from tests.images.recording import RecordingRunner


def test_the_cache_key_follows_every_option() -> None:
    portable, native = EngineBuild(), EngineBuild(cpu=CpuTarget.NATIVE)
    assert portable.version == LLAMA_CPP_PYTHON_VERSION
    assert portable.cache_key() != native.cache_key()
    assert portable.cache_key() != EngineBuild(version="0.3.35").cache_key()
    assert portable.cache_key() == EngineBuild().cache_key()
    options = portable.cmake_options()
    assert options["LLAMA_BUILD_UI"] == options["LLAMA_USE_PREBUILT_UI"] == "OFF"
    assert options["GGML_NATIVE"] == "OFF" and options["GGML_SSE42"] == "ON"
    assert {options[flag] for flag in ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C")} == {"OFF"}
    assert options["GGML_STATIC"] == "ON"


def test_a_failed_download_is_an_engine_error_and_leaves_no_entry(tmp_path: Path) -> None:
    def offline(
        argv: Argv,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> str:
        raise CommandError(argv, 1, "ERROR: Could not find a version that satisfies")

    with pytest.raises(EngineError, match="cannot download") as failed:
        ensure_llama_server(tmp_path, EngineBuild(version="0.0.0"), runner=offline)
    assert failed.value.retryable is True
    assert not (tmp_path / "llm" / "sdist" / "0.0.0").exists()
    assert [
        p.name for p in (tmp_path / "llm" / "sdist").iterdir() if not p.name.startswith(".")
    ] == []


def test_a_configured_binary_is_used_as_it_is(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="not an executable"):
        ensure_llama_server(tmp_path, configured=tmp_path / "absent")
    configured = ensure_llama_server(tmp_path, configured=Path("/bin/busybox"))
    assert configured == EngineBinary(path=Path("/bin/busybox"), build=None)
    assert list(tmp_path.iterdir()) == [], "nothing fetched, nothing built"


def test_the_image_refuses_a_binary_that_needs_a_c_library(tmp_path: Path) -> None:
    assert is_static_executable(Path("/bin/busybox"))
    assert not is_static_executable(Path("/bin/ls"))
    assert not is_static_executable(Path(__file__))
    with pytest.raises(EngineError, match="not a static executable"):
        build_engine_image(tmp_path / "oci", "engine", Path("/bin/ls"))
    assert not (tmp_path / "oci").exists()


@pytest.fixture(scope="module")
def built_engine() -> EngineBinary:
    """The engine hangar builds (whatever HANGAR_LLAMA_SERVER says)."""
    return ensure_llama_server(SUITE_CACHE)


@pytest.mark.slow
def test_the_built_server_is_static_and_cached(built_engine: EngineBinary) -> None:
    binary = built_engine.path
    assert is_static_executable(binary)
    interpreter = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    assert "not a dynamic executable" in interpreter.stdout + interpreter.stderr
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    assert version.returncode == 0, version.stderr
    assert json.loads((binary.parent.parent / "build.json").read_text())["cpu"] == "sse42"
    assert _functions_using_avx_registers(binary) == set(), "ggml is built for SSE4.2 only"

    nothing_runs = RecordingRunner()
    again = ensure_llama_server(SUITE_CACHE, runner=nothing_runs)
    assert again.path == binary
    assert nothing_runs.calls == [], "a cached build runs neither pip nor cmake"


@pytest.mark.slow
def test_the_engine_image_holds_a_runnable_llama_server(
    built_engine: EngineBinary, tmp_path: Path
) -> None:
    layout = tmp_path / "oci"
    build_engine_image(layout, "engine", built_engine.path)
    config = read_config(parse_image_ref(f"oci:{layout}:engine"), layout, "engine")
    assert config.entrypoint == [IMAGE_SERVER_PATH]
    assert config.env["LLAMA_ARG_HOST"] == "0.0.0.0"
    assert config.env["LLAMA_ARG_PORT"] == str(ENGINE_PORT)
    raw = json.loads(
        subprocess.run(
            ["umoci", "stat", "--json", "--image", f"{layout}:engine"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert len(raw["history"]) >= 2  # busybox, then the engine
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:engine", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    server = rootfs / IMAGE_SERVER_PATH.lstrip("/")
    assert server.read_bytes() == built_engine.path.read_bytes()
    assert server.stat().st_mode & 0o111
    assert (rootfs / "bin" / "sh").is_symlink() and (rootfs / "models").is_dir()
    ran = subprocess.run([str(server), "--version"], capture_output=True, text=True)
    assert ran.returncode == 0


def _functions_using_avx_registers(binary: Path) -> set[str]:
    """The ggml and llama functions whose code touches ymm or zmm registers (the C library's
    own AVX variants, chosen at run time by CPUID, do not count)."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(binary)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found: set[str] = set()
    function = ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1].rstrip(">:")
        elif ("ymm" in line or "zmm" in line) and ("ggml" in function or "llama" in function):
            found.add(function)
    return found
