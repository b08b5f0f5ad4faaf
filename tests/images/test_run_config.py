from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.errors import Unprocessable
from hangar.images.busybox import HOST_BUSYBOX
from hangar.images.image_config import ImageConfig
from hangar.images.run_config import DEFAULT_PATH, GuestFile, GuestRunConfig, resolve_argv

IMAGE = ImageConfig(entrypoint=["/entry", "--flag"], cmd=["serve", "--port=80"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ["/entry", "--flag", "serve", "--port=80"]),
        ({"init_cmd": ["worker"]}, ["/entry", "--flag", "worker"]),
        ({"init_entrypoint": ["/bin/sh", "-c"]}, ["/bin/sh", "-c"]),
        ({"init_entrypoint": ["/bin/sh", "-c"], "init_cmd": ["date"]}, ["/bin/sh", "-c", "date"]),
        ({"init_entrypoint": []}, None),
        ({"init_entrypoint": [], "init_cmd": ["/bin/true"]}, ["/bin/true"]),
        ({"init_cmd": []}, ["/entry", "--flag"]),
        ({"init_exec": ["/bin/sleep", "inf"], "init_cmd": ["x"]}, ["/bin/sleep", "inf"]),
        ({"init_exec": []}, ["/entry", "--flag", "serve", "--port=80"]),
    ],
)
def test_resolve_argv_follows_docker_rules(
    overrides: dict[str, list[str]], expected: list[str] | None
) -> None:
    if expected is None:
        with pytest.raises(Unprocessable) as raised:
            resolve_argv(IMAGE, **overrides)
        assert raised.value.fields["field"] == "config.init"
    else:
        assert resolve_argv(IMAGE, **overrides) == expected


def test_image_without_entrypoint_runs_its_cmd() -> None:
    assert resolve_argv(ImageConfig(cmd=["sh"])) == ["sh"]
    with pytest.raises(Unprocessable):
        resolve_argv(ImageConfig())


def test_reads_oci_image_config() -> None:
    config = ImageConfig.from_oci(
        {
            "architecture": "amd64",
            "config": {
                "Entrypoint": ["/e"],
                "Cmd": None,
                "Env": ["PATH=/bin", "EMPTY=", "A=b=c", "BARE"],
                "WorkingDir": "/app",
                "User": "1000:1000",
            },
        }
    )
    assert config == ImageConfig(
        entrypoint=["/e"],
        env={"PATH": "/bin", "EMPTY": "", "A": "b=c", "BARE": ""},
        workdir="/app",
        user="1000:1000",
    )
    assert ImageConfig.from_oci({}) == ImageConfig()


def _config(**fields: object) -> GuestRunConfig:
    return GuestRunConfig.model_validate(
        {"machine_id": "m-1", "argv": ["true"], "hostname": "m-1", **fields}
    )


def test_shell_env_survives_a_real_shell(tmp_path: Path) -> None:
    """What init does with run.env, done by the same busybox sh: every byte comes back."""
    awkward = ["it's", 'say "hi"', "$HOME `id` \\ *", "two\nlines", ""]
    config = _config(
        argv=["/bin/echo", *awkward],
        env={"QUOTED": awkward[0], "SPACES": "a  b", "NEWLINE": "x\ny"},
        workdir="/srv/my app",
        user="app:staff",
        files=[GuestFile(guest_path="/etc/a b", raw_value="", mode=0o600)],
    )
    run_env = tmp_path / "run.env"
    run_env.write_text(config.shell_env())
    script = (
        '. "$1"; eval "set -- $HANGAR_ARGV"; printf "%s\\0" "$@"; printf "|"; '
        'eval "set -- $HANGAR_ENV"; printf "%s\\0" "$@"; printf "|"; '
        'printf "%s\\0" "$HANGAR_WORKDIR" "$HANGAR_USER" "$HANGAR_PATH" "$HANGAR_FILE_COUNT" '
        '"$HANGAR_FILE_0_PATH" "$HANGAR_FILE_0_MODE"'
    )
    out = subprocess.run(
        [str(HOST_BUSYBOX), "sh", "-c", script, "sh", str(run_env)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    argv, env, rest = out.split("|")
    assert argv.split("\0")[:-1] == ["/bin/echo", *awkward]
    assert env.split("\0")[:-1] == [
        f"PATH={DEFAULT_PATH}",
        "HOSTNAME=m-1",
        "QUOTED=it's",
        "SPACES=a  b",
        "NEWLINE=x\ny",
    ]
    assert rest.split("\0")[:-1] == [
        "/srv/my app",
        "app:staff",
        DEFAULT_PATH,
        "1",
        "/etc/a b",
        "600",
    ]


@pytest.mark.parametrize(
    ("workdir", "expected"), [("", "/"), ("app", "/app"), ("/srv//app/", "/srv/app")]
)
def test_workdir_is_absolute_for_init(workdir: str, expected: str) -> None:
    assert f"HANGAR_WORKDIR={expected}\n" in _config(workdir=workdir).shell_env()


def test_tells_init_about_the_driver_bundle_and_the_library_path() -> None:
    plain = _config().shell_env()
    assert "HANGAR_DRIVER_BUNDLE=0\n" in plain
    assert "HANGAR_LD_LIBRARY_PATH=''\n" in plain
    gpu = _config(driver_bundle=True, env={"LD_LIBRARY_PATH": "/usr/local/cuda/lib64"})
    assert "HANGAR_DRIVER_BUNDLE=1\n" in gpu.shell_env()
    assert "HANGAR_LD_LIBRARY_PATH=/usr/local/cuda/lib64\n" in gpu.shell_env()


def test_env_overrides_docker_defaults() -> None:
    config = _config(env={"PATH": "/opt/bin", "HOSTNAME": "custom"})
    assert config.process_env() == {"PATH": "/opt/bin", "HOSTNAME": "custom"}


def test_hosts_file_maps_the_hostname_unless_listed() -> None:
    assert _config(hostname="web").hosts_file().splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "127.0.1.1\tweb",
    ]
    listed = _config(hostname="web", hosts=[("fdaa::3", "web web.internal")]).hosts_file()
    assert "127.0.1.1" not in listed
    assert listed.endswith("fdaa::3\tweb web.internal\n")


@pytest.mark.parametrize(
    "fields",
    [
        {"argv": []},
        {"argv": ["a\0b"]},
        {"env": {"A=B": "x"}},
        {"env": {"": "x"}},
        {"files": [{"guest_path": "relative", "raw_value": ""}]},
        {"files": [{"guest_path": "/", "raw_value": ""}]},
        {"files": [{"guest_path": "/etc/../../init", "raw_value": ""}]},
        {"files": [{"guest_path": "/etc/x", "raw_value": "not base64!"}]},
    ],
)
def test_rejects_configs_init_cannot_run(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _config(**fields)


def test_guest_file_decodes_its_content() -> None:
    raw = base64.b64encode(b"\x00secret\n").decode()
    assert GuestFile(guest_path="/etc/s", raw_value=raw).content() == b"\x00secret\n"
