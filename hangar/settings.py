"""Every ``HANGAR_*`` setting, read once.

The entry points (``hangar server``, the CLI) build one frozen :class:`Settings` from the
environment and pass down what each part needs; nothing else in hangar reads the environment.
The README's configuration table is rendered from the fields here
(:func:`settings_table`), and a test keeps the two the same.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "HANGAR_"
DEFAULT_PORT = 4280
DEFAULT_API_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
DEFAULT_LLM_PORT = 4281
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DATABASE = "hangar.db"
OPERATOR_TOKEN_FILE = "operator.token"
SECRETS_KEY_FILE = "secrets.key"


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "hangar"


def _split(value: object, separator: str) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(separator) if part.strip()]
    return value


class Settings(BaseSettings):
    """hangar's configuration. Each field is the environment variable ``HANGAR_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", env_parse_none_str="none"
    )

    home: Path = Field(
        default_factory=_default_home,
        description="state: SQLite database, per-machine run directories "
        "(default `~/.local/share/hangar`)",
    )
    cache: Path | None = Field(
        default=None,
        description="shared caches: guest kernel, initramfs, image rootfs by digest "
        "(default `$HANGAR_HOME/cache`)",
    )
    region: str = Field(default="local", description="this host's region")
    host_id: str = Field(
        default_factory=socket.gethostname, description="this host's id (default: its hostname)"
    )
    zone: str = Field(
        default="", description="this host's zone within its region (a fleet's agent)"
    )
    pool: Literal["gpu", "general"] | None = Field(
        default=None,
        description="a fleet agent's pool: `gpu` hosts take GPU machines only, `general` CPU "
        "machines (default: `gpu` when the host has GPUs)",
    )
    etcd: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="`http://HOST:PORT,...`: the fleet's etcd (`hangar api` and `hangar agent`)",
    )
    etcd_prefix: str = Field(
        default="/hangar", description="where the fleet's records live in etcd"
    )
    etcd_key_file: Path | None = Field(
        default=None,
        description="the fleet's 32-byte sealing key (mode 0600), the same on every API replica, "
        "and on the agents that boot machines with their apps' secrets (default "
        "`$HANGAR_HOME/fleet.key`, made on first use by an API replica)",
    )
    host_lease_ttl_s: int = Field(
        default=10,
        ge=2,
        le=300,
        description="seconds after its agent's last refresh that a host is unreachable",
    )
    relay_address: str = Field(
        default="",
        description="the address a fleet agent's relay listens on, for API replicas to reach "
        "its guests (default: the address the host reaches its first etcd endpoint from)",
    )
    relay_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="the port of a fleet agent's relay (0: any free port; registered with the "
        "host). Only with `HANGAR_ETCD_KEY_FILE`: without the fleet's key there is no relay",
    )
    api_url: str = Field(default=DEFAULT_API_URL, description="where the CLI finds the API")
    api_token: str | None = Field(
        default=None,
        description="the token the CLI sends (default: `$HANGAR_HOME/operator.token` when "
        "the API URL is this host's loopback)",
    )
    insecure_registries: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="`host:port,...` registries spoken to over plain HTTP (no TLS)",
    )
    guest_kernel: Path | None = Field(
        default=None, description="a guest kernel (vmlinuz) instead of Debian's cloud kernel"
    )
    guest_modules: Path | None = Field(
        default=None, description="the `lib/modules/VERSION` folder of `HANGAR_GUEST_KERNEL`"
    )
    accel: Literal["kvm", "tcg"] | None = Field(
        default=None, description="`kvm` or `tcg` to override the acceleration hangar picks"
    )
    pvm_guest_kernel: bool = Field(
        default=False,
        description="`1` when the guest kernel is built for kvm-pvm hosts (then KVM is used)",
    )
    gpu_driver_bundle: Path | None = Field(
        default=None, description="the NVIDIA driver bundle GPU machines boot with"
    )
    sysfs_root: Path = Field(
        default=Path("/sys"), description="sysfs to read devices from (a fixture tree in tests)"
    )
    nvml: bool = Field(default=True, description="`0` skips NVML")
    sandbox_runtime: Literal["runsc", "runc"] = Field(
        default="runsc",
        description="the sandbox tier's OCI runtime: `runsc` (gVisor); `runc` shares the host "
        "kernel with tenants, so only an operator who accepts that sets it",
    )
    runsc: Path | None = Field(
        default=None,
        description="gVisor's `runsc` (default: `runsc` on `PATH`; `make runsc` installs one "
        "under `.cache/runsc/bin`)",
    )
    runsc_platform: Literal["systrap", "ptrace", "kvm"] = Field(
        default="systrap", description="how gVisor intercepts system calls (default systrap)"
    )
    gpu_share_kinds: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="`kind,...` GPU kinds opened to time shares (`guest.gpu_share`, through "
        "MPS); none by default",
    )
    mps_pipe_root: Path = Field(
        default=Path("/run/hangar-mps"),
        description="where each shared GPU's MPS control daemon keeps its pipes and logs",
    )
    oci_dirs: Annotated[tuple[Path, ...] | None, NoDecode] = Field(
        default=None,
        description="`dir:dir...` where `oci:` image layouts may be (default: `$HANGAR_HOME` "
        "and the system temp directory; set it on a shared host)",
    )
    rate_limits: str = Field(
        default="",
        description="`default=1/3,get_machine=5/10`: requests/s and burst, per action "
        "(default: Fly's)",
    )
    max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES, ge=1024, description="largest request body (4 MiB)"
    )
    volumes_dir: Path | None = Field(
        default=None,
        description="where volume images and keys live (default `$HANGAR_HOME/volumes`)",
    )
    volume_host_key: Path | None = Field(
        default=None,
        description="the host key file wrapping volume keys (default "
        "`$HANGAR_VOLUMES_DIR/host.key`)",
    )
    volume_reserve_gb: float = Field(
        default=1.0, ge=0, description="free disk space volumes never take (default 1)"
    )
    volume_orphan_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="age after which an image or key no volume record names is removed "
        "(default 3600)",
    )
    secrets_key: Path | None = Field(
        default=None,
        description="the key file app secrets are sealed with (default `$HANGAR_HOME/secrets.key`,"
        " made mode 0600 on first use)",
    )
    local_registries: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="`host:port,...` registries that may be on loopback, link-local or this "
        "host's own addresses (refused otherwise)",
    )
    image_workers: int = Field(
        default=4, ge=1, le=256, description="threads pulling and unpacking images (default 4)"
    )
    image_workers_per_org: int = Field(
        default=2,
        ge=1,
        le=256,
        description="image threads one org may hold at a time, so others always get one "
        "(default 2)",
    )
    image_pull_timeout_s: float = Field(
        default=600.0, gt=0, description="longest one image pull may take, in seconds (600)"
    )
    image_command_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="longest any image command (umoci, mke2fs, qemu-img) may run before it is "
        "killed (600)",
    )
    image_max_compressed_mb: int = Field(
        default=4096, ge=1, description="largest image to pull, its layers compressed (4096)"
    )
    image_max_unpacked_mb: int = Field(
        default=16384, ge=1, description="largest image once unpacked (16384)"
    )
    image_cache_gb: float = Field(
        default=20.0,
        gt=0,
        description="size of the image cache; least recently used images no machine uses "
        "are evicted past it (20)",
    )
    console_log_max_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=64 * 1024,
        description="console log kept per machine, in two rotated halves (8 MiB)",
    )
    guest_channel_rate: int = Field(
        default=512 * 1024,
        ge=1024,
        description="bytes/s read from each machine's console and control channels; a "
        "guest writing faster is slowed down (512 KiB)",
    )
    logs_follow_max_s: float = Field(
        default=3600.0, gt=0, description="longest a `logs?follow` stream stays open (3600)"
    )
    max_config_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=64 * 1024,
        description="largest machine config, as JSON (2 MiB)",
    )
    config_versions_kept: int = Field(
        default=10,
        ge=1,
        description="config versions, and finished runs, kept per machine; older ones are "
        "deleted (10)",
    )
    cpu_overcommit: float = Field(
        default=1.0,
        ge=1.0,
        le=64.0,
        description="shared vCPUs admitted per host CPU share (performance vCPUs never "
        "overcommit) (1.0)",
    )
    memory_overcommit: float = Field(
        default=1.0,
        ge=1.0,
        le=8.0,
        description="shared machines' memory admitted per MB the host has (GPU machines "
        "never overcommit) (1.0)",
    )
    default_org_machines: int | None = Field(
        default=100, ge=0, description="machine quota of a new org (`none`: no limit) (100)"
    )
    default_org_memory_mb: int | None = Field(
        default=131072,
        ge=0,
        description="memory quota of a new org, in MB (`none`: no limit) (131072)",
    )
    default_org_gpus: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="GPU quotas of a new org, `kind=N,...` (kinds not named: no limit)",
    )
    app_name_hold_s: float = Field(
        default=86400.0,
        ge=0,
        description="how long a deleted app's name stays with its org before another org "
        "may take it (86400)",
    )
    anonymous_rate_limit: str = Field(
        default="5/20",
        description="requests/s and burst per client address for requests without a valid "
        "token (5/20)",
    )
    audit_retention_days: float = Field(
        default=90.0, gt=0, description="audit records older than this are deleted (90)"
    )
    max_connections: int = Field(
        default=512,
        ge=8,
        description="open connections at most on each listener (the API, the model gateway, a "
        "relay); more are closed (512)",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="time a connection has to send a request's headers, and between body "
        "chunks (10)",
    )
    keepalive_timeout_s: float = Field(
        default=5.0, gt=0, description="idle keep-alive connections are closed after (5)"
    )
    net: bool = Field(default=True, description="`0` runs machines without a network interface")
    net_prefix: str = Field(
        default="fdaa::/16",
        description="the private networks' ULA prefix (inside `fd00::/8`); each org gets a /48",
    )
    net_egress: bool = Field(
        default=True, description="`0` turns off guests' NAT egress on this host's default route"
    )
    net_egress_subnet: str = Field(
        default="172.19.0.0/16", description="the IPv4 addresses guests leave the host from"
    )
    net_egress_interface: str | None = Field(
        default=None, description="where egress leaves (default: the default route's interface)"
    )
    net_host_number: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="this host's number in private addresses (default: from its id)",
    )
    net_link_prefix: str = Field(
        default="hg", description="names of hangar's bridge (`PREFIXbr`) and taps (`PREFIXt...`)"
    )
    net_table: str = Field(default="hangar", description="hangar's nftables tables")
    net_underlay: str = Field(
        default="",
        description="a fleet host's IPv6 address that the other hosts route its machines' "
        "private prefixes to (empty: the private network stays on this host)",
    )
    net_published_tcp: Annotated[frozenset[int], NoDecode] = Field(
        default=frozenset(),
        description="`port,...` of the host that guests may reach (the proxy's)",
    )
    proxy: bool = Field(
        default=True, description="`0`: `hangar server` runs no proxy for machines' services"
    )
    proxy_domain: str = Field(
        default="localhost", description="apps answer HTTP and TLS as `APP.DOMAIN`"
    )
    proxy_bind: str = Field(default="0.0.0.0", description="the address the proxy listens on")
    proxy_port_map: Annotated[dict[int, int], NoDecode] = Field(
        default_factory=dict,
        description="`80=8080,...`: a service port the proxy publishes on another host port "
        "(0: any free port)",
    )
    proxy_idle_stop_s: float = Field(
        default=300.0, gt=0, description="an `autostop` machine without traffic this long stops"
    )
    usage_checkpoint_s: float = Field(
        default=10.0,
        ge=0.5,
        le=3600,
        description="how often the agent writes how long running machines have run: a crash "
        "loses at most this much metered time, never counts any twice (default 10)",
    )
    prices: str = Field(
        default="",
        description="`gpu:l40s=1.25,cpu:performance=0.04,memory_gb=0.007,volume_gb=0.0002`: "
        "prices per hour that replace the defaults (Fly.io's published GPU prices)",
    )
    llm: bool = Field(
        default=True, description="`0`: `hangar server` runs no model gateway (`hangar llm`)"
    )
    llm_bind: str = Field(
        default="127.0.0.1", description="the address the model gateway (OpenAI's API) listens on"
    )
    llm_port: int = Field(
        default=DEFAULT_LLM_PORT,
        ge=0,
        le=65535,
        description=f"the model gateway's port (default {DEFAULT_LLM_PORT}; 0: any free port)",
    )
    llm_idle_s: float = Field(
        default=300.0,
        gt=0,
        description="a model replica without requests this long is put to sleep, down to its "
        "deployment's minimum (default 300)",
    )
    llama_server: Path | None = Field(
        default=None,
        description="a `llama-server` binary to use instead of building one (the engine image "
        "needs it static)",
    )
    crash_after_step: str = Field(
        default="",
        description="test hook: `operation:step` makes the agent SIGKILL itself right after "
        "that step",
    )
    crash_after_step_file: Path | None = Field(
        default=None,
        description="test hook: a file read at each step; when it holds `operation:step`, the "
        "agent removes it and SIGKILLs itself right after that step",
    )

    @field_validator(
        "insecure_registries", "local_registries", "gpu_share_kinds", "etcd", mode="before"
    )
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value, ",")

    @field_validator("default_org_gpus", mode="before")
    @classmethod
    def _kind_counts(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        counts: dict[str, str] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            kind, sep, count = str(item).partition("=")
            if not sep:
                raise ValueError(f"{item!r} is not KIND=COUNT")
            counts[kind.strip()] = count.strip()
        return counts

    @field_validator("net_published_tcp", mode="before")
    @classmethod
    def _ports(cls, value: object) -> object:
        return _split(value, ",")

    @field_validator("proxy_port_map", mode="before")
    @classmethod
    def _port_map(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = [item.strip().partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("must be SERVICE_PORT=HOST_PORT,...")
        return {int(port): int(host) for port, _, host in pairs}

    @field_validator("accel", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() or None if isinstance(value, str) else value

    @field_validator("oci_dirs", mode="before")
    @classmethod
    def _colon_list(cls, value: object) -> object:
        return _split(value, ":")

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else self.home / "cache"

    @property
    def volumes_root(self) -> Path:
        return self.volumes_dir if self.volumes_dir is not None else self.home / "volumes"

    @property
    def llm_images_dir(self) -> Path:
        """The OCI layout of deployments' engine images."""
        return self.home / "llm" / "images"

    @property
    def proxy_state_dir(self) -> Path:
        return self.home / "proxy"

    @property
    def database(self) -> Path:
        return self.home / DATABASE

    @property
    def machines_dir(self) -> Path:
        return self.home / "machines"

    @property
    def fleet_key_file(self) -> Path:
        return self.etcd_key_file if self.etcd_key_file is not None else self.home / "fleet.key"

    @property
    def secrets_key_file(self) -> Path:
        return self.secrets_key if self.secrets_key is not None else self.home / SECRETS_KEY_FILE

    @property
    def operator_token_file(self) -> Path:
        return self.home / OPERATOR_TOKEN_FILE

    @property
    def allowed_oci_dirs(self) -> tuple[Path, ...]:
        if self.oci_dirs is not None:
            return self.oci_dirs
        return (self.home, Path(tempfile.gettempdir()))


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def settings_table() -> str:
    """The README's configuration table, one row per setting."""
    rows = ["| variable | meaning |", "|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `{env_name(name)}` | {field.description} |")
    return "\n".join(rows) + "\n"
