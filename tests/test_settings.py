"""The one settings module: parsing of every HANGAR_* variable, and the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.settings import DEFAULT_API_URL, Settings, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_table_is_the_settings_table() -> None:
    assert settings_table() in README.read_text()


def test_lists_and_paths_are_parsed_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HANGAR_HOME", str(tmp_path))
    monkeypatch.setenv("HANGAR_INSECURE_REGISTRIES", "127.0.0.1:5000, localhost:5001,")
    monkeypatch.setenv("HANGAR_OCI_DIRS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("HANGAR_NVML", "0")
    monkeypatch.delenv("HANGAR_CACHE", raising=False)
    settings = Settings()
    assert settings.insecure_registries == {"127.0.0.1:5000", "localhost:5001"}
    assert settings.allowed_oci_dirs == (tmp_path / "a", tmp_path / "b")
    assert settings.nvml is False
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.database == tmp_path / "hangar.db"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HANGAR_API_URL", "HANGAR_OCI_DIRS", "HANGAR_ACCEL", "HANGAR_HOME"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.api_url == DEFAULT_API_URL
    assert settings.accel is None
    assert settings.home in settings.allowed_oci_dirs


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANGAR_MAX_REQUEST_BYTES", "lots")
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert raised.value.errors()[0]["loc"] == ("max_request_bytes",)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.region = "elsewhere"  # type: ignore[misc]
