"""Every import between hangar's packages points down the layers of ../shared/DESIGN.md: the
vocabulary (model, settings, errors, clock) at the bottom, the pure logic and host libraries
above it, the stores, then the agent, the API, and the entry points (server, CLI, benches)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hangar"

LAYERS: dict[str, int] = {
    # vocabulary: imports nothing of hangar's above it
    "errors": 0,
    "clock": 0,
    "settings": 0,
    "model": 1,
    "ratelimit": 1,
    "localhost": 1,
    "http_server": 1,
    # pure logic and host libraries
    "scheduler": 2,
    "devices": 2,
    "images": 2,
    "vmm": 3,
    "net": 3,
    "volumes": 3,
    # durable state
    "store": 4,
    # the host agent and the traffic it serves
    "agent": 5,
    "proxy": 5,
    "llm": 6,
    # the API and what is built on it
    "metrics": 6,
    "api": 7,
    "web": 8,
    "server": 9,
    "fleet": 9,
    "server_process": 10,
    "bench": 11,
    "cli": 12,
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hangar."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.split(".")[1] for alias in node.names if alias.name.startswith("hangar.")
            )
    return found


def test_every_package_has_a_layer() -> None:
    packages = {
        path.name if path.is_dir() else path.stem
        for path in PACKAGE.iterdir()
        if (path.is_dir() and (path / "__init__.py").exists())
        or (path.suffix == ".py" and path.stem != "__init__")
    }
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_imports_point_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for other in imports_of(path):
            if other != own and LAYERS[other] > LAYERS[own]:
                upward.append(f"{relative} imports hangar.{other}")
    assert upward == []
