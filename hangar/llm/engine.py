"""The model engine: llama.cpp's own ``llama-server``, built once and packed into an OCI image.

The source is the llama.cpp tree that the pinned ``llama-cpp-python`` sdist on PyPI vendors
(fetched with ``pip download``), built with Debian's cmake and gcc: only the ``llama-server``
target, statically linked, without the web UI (whose build would download one). The binary
is cached under ``CACHE/llm/engine/KEY`` where KEY names the version and a hash of the cmake
options, so a build with other options never reuses this one. The default target is SSE4.2
only: QEMU's TCG runs AVX2 about three times slower than SSE, and the same binary runs on any
x86-64 host. ``build_engine_image`` puts the binary beside busybox into an OCI image with umoci.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import struct
import sys
import tarfile
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hangar.errors import EngineError
from hangar.images.build import build_busybox_image, repack_with
from hangar.images.busybox import HOST_BUSYBOX
from hangar.images.cachedir import build_once, scratch_dir
from hangar.images.runner import CommandError, CommandRunner, run_command
from hangar.settings import Settings

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_PROJECT = "llama-cpp-python"
SERVER_TARGET = "llama-server"
ENGINE_PORT = 8080
IMAGE_SERVER_PATH = "/usr/local/bin/llama-server"
IMAGE_MODELS_DIR = "/models"
DEFAULT_BUILD_JOBS = 2
# About 5.5 minutes on an idle two-core machine; on one shared by a dozen busy processes a
# build was still going after an hour (84 of its compile units done). Three hours is stuck.
BUILD_TIMEOUT_S = 3 * 3600.0
DOWNLOAD_TIMEOUT_S = 900.0
_PT_INTERP = 3

# Options every build gets: a static llama-server and nothing else; no web UI, no downloads.
_BASE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "GGML_STATIC": "ON",  # static ggml libraries (its -static reaches only ggml's targets)
    "CMAKE_EXE_LINKER_FLAGS": "-static",  # so llama-server runs in an image of busybox only
    "GGML_OPENMP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
}


class CpuTarget(StrEnum):
    """Which x86-64 instructions the engine may use."""

    SSE42 = "sse42"  # any x86-64 host, and fastest under QEMU's TCG
    NATIVE = "native"  # whatever the build host has (not portable to other hosts)


_CPU_OPTIONS: dict[CpuTarget, dict[str, str]] = {
    CpuTarget.SSE42: {
        "GGML_NATIVE": "OFF",
        "GGML_SSE42": "ON",
        "GGML_AVX": "OFF",
        "GGML_AVX2": "OFF",
        "GGML_AVX512": "OFF",
        "GGML_AVX_VNNI": "OFF",
        "GGML_BMI2": "OFF",
        "GGML_FMA": "OFF",
        "GGML_F16C": "OFF",
        "GGML_AMX_TILE": "OFF",
        "GGML_AMX_INT8": "OFF",
        "GGML_AMX_BF16": "OFF",
    },
    CpuTarget.NATIVE: {"GGML_NATIVE": "ON"},
}


class EngineBuild(BaseModel):
    """What decides the engine binary: the sdist version and the CPU target."""

    model_config = ConfigDict(frozen=True)

    version: str = LLAMA_CPP_PYTHON_VERSION
    cpu: CpuTarget = CpuTarget.SSE42

    def cmake_options(self) -> dict[str, str]:
        return {**_BASE_OPTIONS, **_CPU_OPTIONS[self.cpu]}

    def cache_key(self) -> str:
        """``VERSION-CPU-HASH``: the hash covers every cmake option, so changing one rebuilds."""
        options = ";".join(f"{key}={value}" for key, value in sorted(self.cmake_options().items()))
        digest = hashlib.sha256(f"{self.version}|{options}".encode()).hexdigest()[:16]
        return f"{self.version}-{self.cpu.value}-{digest}"


class EngineBinary(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    build: EngineBuild | None  # None: the binary ``$HANGAR_LLAMA_SERVER`` names


def engine_cache(cache_dir: Path) -> Path:
    return cache_dir / "llm"


def ensure_sdist(
    cache_dir: Path,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    *,
    runner: CommandRunner = run_command,
) -> Path:
    """The ``llama-cpp-python`` sdist of ``version``, downloaded once with pip into the cache."""
    entry = build_once(
        engine_cache(cache_dir) / "sdist" / version,
        lambda staged: _download_sdist(version, staged, runner),
    )
    return _sdist_in(entry, version)


def _sdist_in(entry: Path, version: str) -> Path:
    found = sorted(entry.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise EngineError(f"cache entry {entry} holds no sdist of version {version}", path=entry)
    return found[0]


def _download_sdist(version: str, staged: Path, runner: CommandRunner) -> None:
    argv: list[str | os.PathLike[str]] = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", ":all:", f"{SDIST_PROJECT}=={version}", "--dest", staged,
    ]  # fmt: skip
    try:
        runner(argv, timeout=DOWNLOAD_TIMEOUT_S)
    except CommandError as exc:
        raise EngineError(
            f"cannot download the {SDIST_PROJECT} {version} sdist: {exc.stderr or exc.message}",
            version=version,
            retryable=True,
        ) from exc
    _sdist_in(staged, version)


def ensure_llama_server(
    cache_dir: Path,
    build: EngineBuild | None = None,
    *,
    jobs: int = DEFAULT_BUILD_JOBS,
    configured: Path | None = None,
    runner: CommandRunner = run_command,
) -> EngineBinary:
    """``configured`` when given (``HANGAR_LLAMA_SERVER``: a binary built elsewhere), else the
    ``llama-server`` for ``build``, compiled once per cache key and then reused."""
    if configured is not None:
        if not configured.is_file() or not os.access(configured, os.X_OK):
            raise EngineError(
                f"HANGAR_LLAMA_SERVER={configured} is not an executable file",
                setting="HANGAR_LLAMA_SERVER",
            )
        return EngineBinary(path=configured, build=None)
    build = build or EngineBuild()
    sdist = ensure_sdist(cache_dir, build.version, runner=runner)
    entry = build_once(
        engine_cache(cache_dir) / "engine" / build.cache_key(),
        lambda staged: _compile(sdist, build, staged, jobs, runner),
    )
    return EngineBinary(path=entry / "bin" / SERVER_TARGET, build=build)


def _compile(
    sdist: Path, build: EngineBuild, staged: Path, jobs: int, runner: CommandRunner
) -> None:
    started = time.monotonic()
    with scratch_dir(staged.parent, "compile") as work:
        source = _unpack_llama_cpp(sdist, build.version, work)
        build_dir = work / "build"
        options = [f"-D{key}={value}" for key, value in build.cmake_options().items()]
        # The sdist has no git history, but the cache may lie inside another repository's
        # checkout: keep cmake from taking that repository's commit as llama.cpp's build info.
        env = {**os.environ, "GIT_DIR": os.devnull}
        try:
            runner(["cmake", "-S", source, "-B", build_dir, *options], env=env, timeout=600)
            runner(
                ["cmake", "--build", build_dir, "--target", SERVER_TARGET, "-j", str(max(1, jobs))],
                env=env,
                timeout=BUILD_TIMEOUT_S,
            )
        except CommandError as exc:
            raise EngineError(
                f"building {SERVER_TARGET} {build.version} failed: {exc.message}",
                version=build.version,
                cpu=build.cpu.value,
                argv=exc.argv,
            ) from exc
        built = build_dir / "bin" / SERVER_TARGET
        if not built.is_file():
            raise EngineError(f"the build left no {built.name}", version=build.version)
        (staged / "bin").mkdir()
        built.rename(staged / "bin" / SERVER_TARGET)
    (staged / "bin" / SERVER_TARGET).chmod(0o755)
    (staged / "build.json").write_text(build.model_dump_json())
    log.info(
        "built %s %s (%s) in %.0f s",
        SERVER_TARGET,
        build.version,
        build.cpu.value,
        time.monotonic() - started,
    )


def _unpack_llama_cpp(sdist: Path, version: str, work: Path) -> Path:
    """Unpack only the vendored llama.cpp tree of the sdist; return its folder."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.name.startswith(prefix)]
        if not members:
            raise EngineError(f"{sdist.name} vendors no llama.cpp tree", sdist=str(sdist))
        archive.extractall(work / "src", members=members, filter="data")
    return work / "src" / prefix


def is_static_executable(path: Path) -> bool:
    """Whether ``path`` is a 64-bit ELF executable that needs no dynamic loader (it has no
    ``PT_INTERP`` program header), so it runs in an image without a C library."""
    with open(path, "rb") as elf:
        header = elf.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        order = "<" if header[5] == 1 else ">"
        (phoff,) = struct.unpack_from(f"{order}Q", header, 32)
        phentsize, phnum = struct.unpack_from(f"{order}HH", header, 54)
        elf.seek(phoff)
        table = elf.read(phentsize * phnum)
    kinds = [struct.unpack_from(f"{order}I", table, i * phentsize)[0] for i in range(phnum)]
    return _PT_INTERP not in kinds


def build_engine_image(
    oci_layout_dir: Path,
    tag: str,
    server: Path,
    *,
    port: int = ENGINE_PORT,
    busybox: Path = HOST_BUSYBOX,
    runner: CommandRunner = run_command,
) -> None:
    """Write image ``tag`` into ``oci_layout_dir``: busybox, then a layer with ``server`` at
    ``/usr/local/bin/llama-server`` and an empty ``/models``.

    The entrypoint is ``llama-server``; it listens on ``0.0.0.0:port`` (``LLAMA_ARG_HOST`` and
    ``LLAMA_ARG_PORT``) and the machine names its model with ``LLAMA_ARG_MODEL`` or with
    arguments after the entrypoint (``--model /models/FILE.gguf``).
    """
    if not server.is_file():
        raise EngineError(f"no engine binary at {server}", path=str(server))
    if not is_static_executable(server):
        raise EngineError(
            f"{server} is not a static executable: the engine image holds no C library",
            path=str(server),
        )
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_PORT": str(port),
    }
    build_busybox_image(oci_layout_dir, tag, [], env, busybox=busybox, runner=runner)

    def add_engine(rootfs: Path) -> None:
        target = rootfs / IMAGE_SERVER_PATH.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(server.read_bytes())
        target.chmod(0o755)
        (rootfs / IMAGE_MODELS_DIR.lstrip("/")).mkdir(exist_ok=True)

    repack_with(oci_layout_dir, tag, add_engine, runner=runner)
    runner(
        [
            "umoci", "config", "--image", f"{oci_layout_dir}:{tag}",
            f"--config.entrypoint={IMAGE_SERVER_PATH}",
            f"--config.exposedports={port}/tcp",
        ]
    )  # fmt: skip
    runner(["umoci", "gc", "--layout", oci_layout_dir])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hangar.llm.engine [--cpu sse42|native] [--image LAYOUT:TAG]``: build (or find
    in the cache) llama-server, print its path, and optionally write the engine image."""
    parser = argparse.ArgumentParser(
        prog="python -m hangar.llm.engine",
        description="Build llama-server from the pinned llama-cpp-python sdist, once.",
    )
    parser.add_argument("--cpu", choices=[t.value for t in CpuTarget], default=CpuTarget.SSE42)
    parser.add_argument("--jobs", type=int, default=DEFAULT_BUILD_JOBS)
    parser.add_argument("--image", metavar="LAYOUT:TAG", help="also write the engine OCI image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    binary = ensure_llama_server(
        settings.cache_dir,
        EngineBuild(cpu=CpuTarget(args.cpu)),
        jobs=args.jobs,
        configured=settings.llama_server,
    )
    print(binary.path)
    if args.image:
        layout, _, tag = str(args.image).rpartition(":")
        if not layout or not tag:
            parser.error("--image takes LAYOUT:TAG")
        build_engine_image(Path(layout), tag, binary.path)
        print(f"oci:{layout}:{tag}")


if __name__ == "__main__":
    main()
