from __future__ import annotations

import pytest

from hangar.errors import InvalidRequest
from hangar.images.reference import ImageRef, parse_image_ref

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("alpine", ImageRef(registry="docker.io", repository="library/alpine", tag="latest")),
        ("alpine:3.19", ImageRef(registry="docker.io", repository="library/alpine", tag="3.19")),
        (
            "docker.io/library/alpine",
            ImageRef(registry="docker.io", repository="library/alpine", tag="latest"),
        ),
        (
            "index.docker.io/library/alpine",
            ImageRef(registry="docker.io", repository="library/alpine", tag="latest"),
        ),
        (
            "flyio/hellofly",
            ImageRef(registry="docker.io", repository="flyio/hellofly", tag="latest"),
        ),
        (
            "127.0.0.1:5000/hello:latest",
            ImageRef(registry="127.0.0.1:5000", repository="hello", tag="latest"),
        ),
        (
            "docker://127.0.0.1:5000/team/hello:v2",
            ImageRef(registry="127.0.0.1:5000", repository="team/hello", tag="v2"),
        ),
        ("localhost/app", ImageRef(registry="localhost", repository="app", tag="latest")),
        (
            "registry.fly.io/my-app:deployment-01H",
            ImageRef(registry="registry.fly.io", repository="my-app", tag="deployment-01H"),
        ),
        (
            f"ghcr.io/org/app@{DIGEST}",
            ImageRef(registry="ghcr.io", repository="org/app", tag=None, digest=DIGEST),
        ),
        (
            f"ghcr.io/org/app:1.0@{DIGEST}",
            ImageRef(registry="ghcr.io", repository="org/app", tag="1.0", digest=DIGEST),
        ),
        (
            "oci:/srv/layouts/app",
            ImageRef(transport="oci", repository="/srv/layouts/app", tag="latest"),
        ),
        ("oci:build/app:v1", ImageRef(transport="oci", repository="build/app", tag="v1")),
    ],
)
def test_parses_references(reference: str, expected: ImageRef) -> None:
    assert parse_image_ref(reference) == expected


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "   ",
        "Alpine",
        "alpine:",
        "alpine:bad/tag",
        "alpine@sha256:short",
        "alpine@md5:" + "0" * 32,
        "ghcr.io/",
        "ghcr.io/org//app",
        "ghcr.io/-org/app",
        "ex ample.com/app",
        "oci:",
        "oci:/layout:bad tag",
        "a/" * 130 + "b",
    ],
)
def test_rejects_bad_references_naming_the_field(reference: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_image_ref(reference)
    assert raised.value.fields["field"] == "config.image"
    assert raised.value.fields["reference"] == reference


@pytest.mark.parametrize(
    ("reference", "text", "skopeo"),
    [
        ("alpine", "docker.io/library/alpine:latest", "docker://docker.io/library/alpine:latest"),
        (
            f"127.0.0.1:5000/hello:v1@{DIGEST}",
            f"127.0.0.1:5000/hello:v1@{DIGEST}",
            f"docker://127.0.0.1:5000/hello@{DIGEST}",
        ),
        ("oci:dir/app", "oci:dir/app:latest", "oci:dir/app:latest"),
    ],
)
def test_renders_names(reference: str, text: str, skopeo: str) -> None:
    ref = parse_image_ref(reference)
    assert str(ref) == text
    assert ref.skopeo_name() == skopeo
    assert parse_image_ref(text) == ref


def test_with_digest_pins_a_copy() -> None:
    ref = parse_image_ref("alpine:3.19")
    pinned = ref.with_digest(DIGEST)
    assert (pinned.tag, pinned.digest, ref.digest) == ("3.19", DIGEST, None)
