from __future__ import annotations

import base64
import logging

import pytest
from pydantic import ValidationError

from hangar.errors import UnsupportedField
from hangar.model.config import MachineConfig, signal_number
from hangar.model.duration import format_duration, parse_duration


def test_minimal_config_gets_fly_defaults() -> None:
    config = MachineConfig.model_validate({"image": "busybox"})
    assert config.guest.cpus == 1
    assert config.guest.memory_mb == 256
    assert config.guest.cpu_kind == "shared"
    assert config.restart.policy == "on-failure"
    assert config.restart.effective_max_retries == 10
    assert config.stop_config.timeout_seconds == 5.0
    assert config.stop_config.signal_number == 15


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"image": "x", "mounts": [{"volume": "v", "path": "/d", "add_size_gb": 1}]},
            "config.mounts.add_size_gb",
        ),
        ({"image": "x", "guest": {"kernel_args": ["quiet"]}}, "config.guest.kernel_args"),
        ({"image": "x", "init": {"tty": True}}, "config.init.tty"),
        ({"image": "x", "init": {"kernel_args": ["quiet"]}}, "config.init.kernel_args"),
        ({"image": "x", "guest": {"max_memory_mb": 512}}, "config.guest.max_memory_mb"),
        ({"image": "x", "dns": {"skip_registration": True}}, "config.dns"),
        ({"image": "x", "metrics": {"port": 9091, "path": "/m"}}, "config.metrics"),
        ({"image": "x", "restart": {"gpu_bid_price": 1.5}}, "config.restart.gpu_bid_price"),
        (
            {"image": "x", "files": [{"guest_path": "/a", "image_config": "img"}]},
            "config.files.image_config",
        ),
    ],
)
def test_fields_hangar_cannot_honour_are_named(body: dict[str, object], field: str) -> None:
    with pytest.raises(UnsupportedField) as caught:
        MachineConfig.model_validate(body)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"image": "x", "guest": {"cpus": 0}}, ("guest", "cpus")),
        ({"image": "x", "guest": {"memory_mb": 100}}, ("guest", "memory_mb")),
        ({"image": "x", "guest": {"memory_mb": 300}}, ("guest", "memory_mb")),
        ({"image": "x", "restart": {"policy": "sometimes"}}, ("restart", "policy")),
        ({"image": "x", "env": {"1BAD": "v"}}, ("env",)),
        ({"image": "x", "metadata": {"bad key": "v"}}, ("metadata",)),
        (
            {"image": "x", "files": [{"guest_path": "rel", "raw_value": ""}]},
            ("files", 0, "guest_path"),
        ),
        (
            {"image": "x", "files": [{"guest_path": "/a/../b", "raw_value": ""}]},
            ("files", 0, "guest_path"),
        ),
        (
            {"image": "x", "files": [{"guest_path": "/a", "raw_value": "!!"}]},
            ("files", 0, "raw_value"),
        ),
        ({"image": "x", "stop_config": {"timeout": "forever"}}, ("stop_config", "timeout")),
        ({"image": "x", "stop_config": {"signal": "SIGNOPE"}}, ("stop_config", "signal")),
        ({"image": ""}, ("image",)),
        ({"image": None}, ("image",)),
        ({"image": "x", "files": [{"guest_path": "/a"}]}, ("files", 0)),
        (
            {"image": "x", "files": [{"guest_path": "/a", "raw_value": "", "secret_name": "S"}]},
            ("files", 0),
        ),
    ],
)
def test_invalid_fields_fail_with_their_location(
    body: dict[str, object], location: tuple[object, ...]
) -> None:
    with pytest.raises(ValidationError) as caught:
        MachineConfig.model_validate(body)
    assert caught.value.errors()[0]["loc"] == location


def test_a_config_as_go_writes_it_decodes() -> None:
    """Zero values of fields hangar cannot honour, nulls and unknown keys: as Go's decoder."""
    config = MachineConfig.model_validate(
        {
            "image": "x",
            "init": {"tty": False, "swap_size_mb": None, "kernel_args": []},
            "guest": {"cpus": 2, "memory_mb": 512, "gpus": 0, "max_memory_mb": 0},
            "env": None,
            "metadata": None,
            "files": None,
            "services": None,
            "checks": None,
            "mounts": [],
            "dns": {"skip_registration": False},
            "restart": {"policy": "", "max_retries": 0},
            "stop_config": {"timeout": "1m0s", "signal": ""},
            "disable_machine_autostart": False,
            "a_key_from_a_newer_client": {"anything": 1},
        }
    )
    assert config.env == {} and config.metadata == {} and config.files == []
    assert config.guest.cpus == 2 and config.guest.gpus is None
    assert config.restart.policy == "on-failure"
    assert config.stop_config.timeout_seconds == 60.0
    assert config.stop_config.signal is None
    assert "a_key_from_a_newer_client" not in config.model_dump()


def test_unknown_keys_are_logged_by_name_never_by_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="hangar.model.fly"):
        MachineConfig.model_validate({"image": "x", "newer_field": "value-never-logged"})
    assert "newer_field" in caplog.text
    assert "value-never-logged" not in caplog.text


def test_a_file_from_a_secret() -> None:
    config = MachineConfig.model_validate(
        {"image": "x", "files": [{"guest_path": "/etc/key", "secret_name": "API_KEY", "mode": 0}]}
    )
    assert config.files[0].secret_name == "API_KEY"
    assert config.files[0].mode is None
    with pytest.raises(ValidationError):
        MachineConfig.model_validate(
            {"image": "x", "files": [{"guest_path": "/a", "secret_name": "not a name"}]}
        )


def test_files_are_base64_and_bounded() -> None:
    ok = base64.b64encode(b"hello").decode()
    config = MachineConfig.model_validate(
        {"image": "x", "files": [{"guest_path": "/etc/app.conf", "raw_value": ok}]}
    )
    assert config.files[0].guest_path == "/etc/app.conf"
    too_big = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
    with pytest.raises(ValidationError):
        MachineConfig.model_validate(
            {"image": "x", "files": [{"guest_path": "/a", "raw_value": too_big}]}
        )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5_000_000_000, 5.0),
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1m0s", 60.0),
        ("1h2m3.5s", 3723.5),
        ("0", 0.0),
        ({"Duration": 3_000_000_000}, 3.0),
    ],
)
def test_durations_as_fly_clients_send_them(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "10", "1y", "-1s", "25h", "1e3s", True, None, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.5, "500ms"), (60.0, "1m0s"), (3723.5, "1h2m3.5s"), (1e-6, "1µs")],
)
def test_durations_are_written_as_go_writes_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_signals_by_name_and_number() -> None:
    assert signal_number("SIGINT") == 2
    assert signal_number("term") == 15
    assert signal_number("9") == 9
    with pytest.raises(ValueError):
        signal_number("SIGWHAT")


def test_mounts_name_a_volume_once_at_a_usable_path() -> None:
    config = MachineConfig.model_validate(
        {"image": "x", "mounts": [{"volume": "vol_a", "path": "/data", "name": "data"}]}
    )
    assert [(m.volume, m.path, m.name) for m in config.mounts] == [("vol_a", "/data", "data")]
    for mounts in (
        [{"volume": "vol_a", "path": "data"}],
        [{"volume": "vol_a", "path": "/"}],
        [{"volume": "vol_a", "path": "/a/../b"}],
        [{"volume": "vol_a", "path": "/my data"}],
        [{"volume": "vol_a", "path": "/proc/x"}],
        [{"volume": "vol_a"}],
        [{"volume": "vol_a", "path": "/a"}, {"volume": "vol_a", "path": "/b"}],
        [{"volume": "vol_a", "path": "/a"}, {"volume": "vol_b", "path": "/a/"}],
        [{"volume": f"vol_{n}", "path": f"/m{n}"} for n in range(9)],
    ):
        with pytest.raises(ValidationError):
            MachineConfig.model_validate({"image": "x", "mounts": mounts})


def test_a_mount_as_go_writes_it_decodes() -> None:
    """fly-go's ``MachineMount`` with its zero values and a key hangar does not know."""
    mount = {
        "volume": "vol_a",
        "path": "/data",
        "name": "",
        "size_gb": 0,
        "encrypted": False,
        "extend_threshold_percent": 0,
        "add_size_gb": 0,
        "size_gb_limit": 0,
        "some_later_field": {"x": 1},
    }
    config = MachineConfig.model_validate({"image": "x", "mounts": [mount]})
    assert config.model_dump(mode="json", exclude_none=True)["mounts"] == [
        {"volume": "vol_a", "path": "/data", "encrypted": False}
    ]
    assert MachineConfig.model_validate({"image": "x", "mounts": None}).mounts == []
    with pytest.raises(UnsupportedField) as refused:
        MachineConfig.model_validate({"image": "x", "mounts": [{**mount, "size_gb_limit": 10}]})
    assert refused.value.field == "config.mounts.size_gb_limit"
