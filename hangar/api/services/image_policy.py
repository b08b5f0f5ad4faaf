"""Which images a machine may name: well-formed references, and ``oci:`` layouts only under
the directories the operator allows (``HANGAR_OCI_DIRS``), so that no tenant can make the
host read a directory of its choosing. This is the early answer, at create; the image layer
checks again at every resolve (``hangar.images.local_layout``), on the real path, and says
the same thing whatever is (or is not) at the path."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from hangar.errors import InvalidRequest, Unprocessable
from hangar.images.reference import IMAGE_FIELD, parse_image_ref
from hangar.settings import env_name

OCI_DIRS_ENV = env_name("oci_dirs")


class ImagePolicy:
    def __init__(self, oci_dirs: Iterable[Path]) -> None:
        # Resolved once, so that a link among them cannot widen the list later.
        self.oci_dirs = [Path(os.path.realpath(directory)) for directory in oci_dirs]

    def check(self, image: str) -> None:
        try:
            reference = parse_image_ref(image)
        except InvalidRequest as exc:
            raise Unprocessable(f"{IMAGE_FIELD}: {exc.message}", field=IMAGE_FIELD) from None
        if reference.transport != "oci":
            return
        layout = Path(reference.repository)
        if not layout.is_absolute() or "\x00" in reference.repository:
            raise Unprocessable(
                f"{IMAGE_FIELD}: an oci: layout path must be absolute, without NUL",
                field=IMAGE_FIELD,
            )
        # realpath follows every link, so a link inside an allowed directory that points
        # out of it is judged by where it leads.
        resolved = Path(os.path.realpath(layout))
        if not any(resolved == root or root in resolved.parents for root in self.oci_dirs):
            raise Unprocessable(
                f"{IMAGE_FIELD}: oci: layout {reference.repository} cannot be used: oci: "
                f"layouts must be under a directory the operator allows ({OCI_DIRS_ENV})",
                field=IMAGE_FIELD,
            )
