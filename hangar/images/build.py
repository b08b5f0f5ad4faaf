"""Build small real OCI images without docker (umoci only): the demo image and test images."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from hangar.images.busybox import HOST_BUSYBOX, install_busybox
from hangar.images.cachedir import scratch_dir
from hangar.images.runner import CommandRunner, run_command

BASE_FILES = {
    "etc/passwd": (
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    ),
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}
BASE_DIRS = ("etc", "root", "tmp", "proc", "sys", "dev")
DEMO_CMD = ["sh", "-c", "echo hello from a hangar machine"]


def repack_with(
    layout: Path,
    tag: str,
    edit: Callable[[Path], None],
    *,
    runner: CommandRunner = run_command,
) -> None:
    """Add one layer to ``layout:tag`` holding what ``edit(rootfs)`` changes (deletions too)."""
    image = f"{layout}:{tag}"
    with scratch_dir(layout.parent, "repack") as work:
        bundle = work / "bundle"
        runner(["umoci", "unpack", "--rootless", "--image", image, bundle])
        edit(bundle / "rootfs")
        runner(["umoci", "repack", "--image", image, bundle])


def build_busybox_image(
    oci_layout_dir: Path,
    tag: str,
    cmd: list[str],
    env: Mapping[str, str],
    *,
    busybox: Path = HOST_BUSYBOX,
    runner: CommandRunner = run_command,
) -> None:
    """Write image ``tag`` into the OCI layout ``oci_layout_dir`` (created if needed):
    one layer with static busybox, its applet links, a minimal /etc; the given cmd and env."""
    if not (oci_layout_dir / "index.json").exists():
        runner(["umoci", "init", "--layout", oci_layout_dir])
    image = f"{oci_layout_dir}:{tag}"
    runner(["umoci", "new", "--image", image])

    def add_busybox(rootfs: Path) -> None:
        for folder in BASE_DIRS:
            (rootfs / folder).mkdir(parents=True, exist_ok=True)
        (rootfs / "tmp").chmod(0o1777)
        for name, content in BASE_FILES.items():
            (rootfs / name).write_text(content)
        install_busybox(rootfs, busybox, runner=runner)

    repack_with(oci_layout_dir, tag, add_busybox, runner=runner)
    runner(
        [
            "umoci", "config", "--image", image,
            *(f"--config.cmd={word}" for word in cmd),
            *(f"--config.env={key}={value}" for key, value in env.items()),
        ]
    )  # fmt: skip
    runner(["umoci", "gc", "--layout", oci_layout_dir])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hangar.images.build LAYOUT TAG [CMD...]`` (used by ``make demo``)."""
    parser = argparse.ArgumentParser(
        prog="python -m hangar.images.build",
        description="Build a small busybox OCI image into an OCI layout (created if missing).",
    )
    parser.add_argument("layout", type=Path, help="OCI layout folder")
    parser.add_argument("tag", help="image tag in the layout (replaced if it exists)")
    parser.add_argument("cmd", nargs="*", help=f"the image's cmd (default: {DEMO_CMD})")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)
    env = dict(item.partition("=")[::2] for item in args.env)
    build_busybox_image(args.layout, args.tag, args.cmd or DEMO_CMD, env)
    print(f"oci:{args.layout}:{args.tag}")


if __name__ == "__main__":
    main()
