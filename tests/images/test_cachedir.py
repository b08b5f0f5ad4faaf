from __future__ import annotations

from pathlib import Path

import pytest

from hangar.images.cachedir import build_once, remove_tree, write_atomically


def test_builds_an_entry_once(tmp_path: Path) -> None:
    builds: list[Path] = []

    def build(staged: Path) -> None:
        builds.append(staged)
        (staged / "artefact").write_text("built")

    entry = tmp_path / "cache" / "entry"
    assert build_once(entry, build) == entry
    assert build_once(entry, build) == entry
    assert len(builds) == 1
    assert (entry / "artefact").read_text() == "built"
    assert sorted(path.name for path in entry.parent.iterdir()) == [".entry.lock", "entry"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def build(staged: Path) -> None:
        (staged / "half").write_text("half")
        raise RuntimeError("build broke")

    with pytest.raises(RuntimeError, match="build broke"):
        build_once(tmp_path / "entry", build)
    assert [path.name for path in tmp_path.iterdir()] == [".entry.lock"]


def test_remove_tree_gets_through_read_only_folders(tmp_path: Path) -> None:
    locked = tmp_path / "tree" / "locked"
    locked.mkdir(parents=True)
    (locked / "file").write_text("x")
    (locked / "inner").mkdir()
    (locked / "inner").chmod(0o500)
    locked.chmod(0o500)
    remove_tree(tmp_path / "tree")
    assert not (tmp_path / "tree").exists()
    remove_tree(tmp_path / "tree")


def test_write_atomically_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "pointer.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert [path.name for path in tmp_path.iterdir()] == ["pointer.json"]
