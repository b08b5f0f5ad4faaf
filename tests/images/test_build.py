from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hangar.images.build import DEMO_CMD, build_busybox_image, main
from hangar.images.image_config import ImageConfig
from hangar.images.oci import read_config
from hangar.images.reference import parse_image_ref


def test_builds_a_busybox_image_without_docker(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_busybox_image(layout, "one", ["echo", "one"], {"A": "1"})
    build_busybox_image(layout, "two", ["sh", "-c", "exit 2"], {"PATH": "/bin", "B": "two words"})

    tags = subprocess.run(
        ["umoci", "ls", "--layout", str(layout)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert sorted(tags) == ["one", "two"]
    assert read_config(parse_image_ref(f"oci:{layout}:two"), layout, "two") == ImageConfig(
        cmd=["sh", "-c", "exit 2"], env={"PATH": "/bin", "B": "two words"}
    )
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    assert len(manifest["layers"]) == 1


def test_command_line_builds_the_demo_image_again_and_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = tmp_path / "demo"
    ref = parse_image_ref(f"oci:{layout}:demo")
    main([str(layout), "demo"])
    assert read_config(ref, layout, "demo") == ImageConfig(cmd=DEMO_CMD)
    main([str(layout), "demo", "--env", "A=1=2", "echo", "hi"])
    assert read_config(ref, layout, "demo") == ImageConfig(cmd=["echo", "hi"], env={"A": "1=2"})
    assert capsys.readouterr().out == f"oci:{layout}:demo\n" * 2
