"""Image references: ``[docker://][REGISTRY/]REPOSITORY[:TAG][@DIGEST]`` and ``oci:PATH[:TAG]``.

Registry references follow Docker's normalisation: no registry means ``docker.io``, a
one-component repository on Docker Hub means ``library/NAME``, no tag and no digest means
``latest``. The first component names a registry only if it has a ``.`` or a ``:`` or is
``localhost``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hangar.errors import InvalidRequest

IMAGE_FIELD = "config.image"
DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
OCI_DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?"
)

Transport = Literal["docker", "oci"]


class ImageRef(BaseModel):
    """A parsed image reference. For ``oci`` refs ``repository`` is the layout's path."""

    model_config = ConfigDict(frozen=True)

    transport: Transport = "docker"
    registry: str = ""
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.transport == "oci":
            return f"oci:{self.repository}:{self.tag}"
        name = f"{self.registry}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name

    def skopeo_name(self) -> str:
        """The source name skopeo understands; pinned by digest when there is one."""
        if self.transport == "oci":
            return f"oci:{self.repository}:{self.tag}"
        name = f"docker://{self.registry}/{self.repository}"
        return f"{name}@{self.digest}" if self.digest else f"{name}:{self.tag}"

    def with_digest(self, digest: str) -> ImageRef:
        return self.model_copy(update={"digest": digest})


def _invalid(reference: str, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"invalid image reference {reference!r}: {reason}",
        field=IMAGE_FIELD,
        reference=reference,
    )


def parse_image_ref(reference: str) -> ImageRef:
    """Parse ``reference``; raise ``InvalidRequest`` naming ``config.image`` if it is malformed."""
    text = reference.strip()
    if not text:
        raise _invalid(reference, "it is empty")
    if text.startswith("oci:"):
        return _parse_oci(reference, text.removeprefix("oci:"))
    return _parse_docker(reference, text.removeprefix("docker://"))


def _parse_oci(reference: str, rest: str) -> ImageRef:
    path, _, tag = rest.partition(":")
    if not path:
        raise _invalid(reference, "an oci: reference needs a layout path")
    tag = tag or OCI_DEFAULT_TAG
    if not _TAG.fullmatch(tag):
        raise _invalid(reference, f"bad tag {tag!r}")
    return ImageRef(transport="oci", repository=path, tag=tag)


def _parse_docker(reference: str, rest: str) -> ImageRef:
    name, at, digest = rest.partition("@")
    if at and not DIGEST_PATTERN.fullmatch(digest):
        raise _invalid(reference, f"bad digest {digest!r} (expected sha256:<64 hex>)")
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _invalid(reference, f"bad tag {tag!r}")
    if not name:
        raise _invalid(reference, "no repository name")
    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(reference, f"name longer than {MAX_NAME_LENGTH} characters")

    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise _invalid(reference, f"bad registry {first!r}")
        registry, repository = first, remainder
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise _invalid(
                reference,
                f"bad repository component {component!r} (lowercase letters, digits, . _ -)",
            )
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest or None)
