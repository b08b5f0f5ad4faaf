"""The image a deployment's replicas run with ``--engine llama.cpp``: the engine image (built
once per server from the cached ``llama-server``), plus, for a model given as a file on the
server's host, a layer holding that file at ``/models/FILE``. Written into an OCI layout under
the server's state, one tag per deployment, and named ``oci:LAYOUT:TAG``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hangar.errors import EngineError, Unprocessable
from hangar.images.build import repack_with
from hangar.images.cachedir import build_once
from hangar.images.runner import CommandError, run_command
from hangar.llm.engine import IMAGE_MODELS_DIR, build_engine_image, ensure_llama_server

ENGINE_TAG = "engine"
MAX_MODEL_BYTES = 64 * 1024**3


def check_model_file(path: Path, allowed: tuple[Path, ...]) -> Path:
    """``path`` resolved, when it is a regular file under one of the ``allowed`` folders (the
    operator's ``HANGAR_OCI_DIRS``: no tenant makes the server read a file of its choosing)
    and no larger than ``MAX_MODEL_BYTES``."""
    resolved = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(root)) for root in allowed]
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise Unprocessable(
            "model: a model file must be under a directory the operator allows (HANGAR_OCI_DIRS)",
            field="model",
        )
    if not resolved.is_file():
        raise Unprocessable(f"model: no file at {path}", field="model")
    if resolved.stat().st_size > MAX_MODEL_BYTES:
        raise Unprocessable(f"model: {path} is larger than {MAX_MODEL_BYTES} bytes", field="model")
    return resolved


def deployment_image(
    layout: Path,
    tag: str,
    cache: Path,
    *,
    model: Path | None,
    configured_server: Path | None = None,
) -> str:
    """Write ``layout:tag`` (the engine, and ``model`` at ``/models/NAME`` when given) and
    return its reference. The engine binary and the bare engine image are built once."""
    binary = ensure_llama_server(cache, configured=configured_server)
    layout.parent.mkdir(parents=True, exist_ok=True)
    base = (
        build_once(
            layout.parent / "engine-layout",
            lambda staged: build_engine_image(staged / "oci", ENGINE_TAG, binary.path),
        )
        / "oci"
    )
    if not (layout / "index.json").exists():
        shutil.copytree(base, layout, symlinks=True)
    _copy_tag(layout, ENGINE_TAG, tag)
    if model is not None:
        name = model.name

        def add_model(rootfs: Path) -> None:
            target = rootfs / IMAGE_MODELS_DIR.lstrip("/") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model, target)
            target.chmod(0o444)

        repack_with(layout, tag, add_model)
    return f"oci:{layout}:{tag}"


def _copy_tag(layout: Path, source: str, tag: str) -> None:
    try:
        run_command(["umoci", "tag", "--image", f"{layout}:{source}", tag])
    except CommandError as exc:
        raise EngineError(f"cannot tag the engine image as {tag}: {exc}", tag=tag) from exc
