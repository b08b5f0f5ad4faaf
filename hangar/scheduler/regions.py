"""Region expressions: ``ord``, ``ord,iad`` (fallback in that order) and aliases such as ``us``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from hangar.errors import InvalidRequest

_TOKEN = re.compile(r"^[a-z][a-z0-9-]{1,31}$")

DEFAULT_ALIASES: Mapping[str, Sequence[str]] = {
    "us": ("ord", "iad", "dfw", "sjc", "lax", "sea", "ewr", "atl", "den", "mia", "bos"),
    "eu": ("ams", "fra", "lhr", "cdg", "arn", "mad", "waw", "otp"),
    "asia": ("nrt", "sin", "hkg", "bom"),
}


class RegionCatalog:
    """Expands region expressions against the regions the fleet actually has."""

    def __init__(self, aliases: Mapping[str, Sequence[str]] = DEFAULT_ALIASES) -> None:
        self._aliases = {name: tuple(regions) for name, regions in aliases.items()}

    def expand(self, expression: str, known: Iterable[str]) -> tuple[str, ...]:
        """Regions to try, in order. An empty expression means every known region (sorted);
        an alias keeps its own order and drops regions the fleet lacks."""
        known_set = set(known)
        if not expression.strip():
            return tuple(sorted(known_set))
        ordered: list[str] = []
        for raw in expression.split(","):
            token = raw.strip().lower()
            if not _TOKEN.fullmatch(token):
                raise InvalidRequest(f"invalid region {raw.strip()!r}", field="region")
            if token in self._aliases:
                candidates: Sequence[str] = [r for r in self._aliases[token] if r in known_set]
            else:
                candidates = [token]
            for region in candidates:
                if region not in ordered:
                    ordered.append(region)
        return tuple(ordered)
