"""Version references, parsed in one place: every command, HTTP route and config that names
a version goes through `parse_ref`.

A reference is `latest`, a version id (`3` or `v3`, ASCII digits only), or a hex prefix of
the version's checksum of at least 8 characters. Anything else is refused with this rule,
so no reference ever reaches the index as a pattern (`%` and `_` are not wildcards) and
no odd digit (`²`) or endless number reaches `int()`.
"""

import re
from dataclasses import dataclass

from coldfusion.infra.errors import ColdFusionError

MIN_PREFIX = 8
MAX_ID_DIGITS = 18  # fits a 64-bit integer column
RULE = (f"a version is 'latest', an id (3 or v3) or a checksum prefix of at least {MIN_PREFIX} hex characters")
_ID = re.compile(rf"v?([0-9]{{1,{MAX_ID_DIGITS}}})")
_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")


class BadReference(ColdFusionError):
    """A version reference that breaks the rule (not one that names no version)."""


@dataclass(frozen=True)
class VersionRef:
    """What a reference asks for: exactly one of `latest`, `id` or `prefix`."""

    latest: bool = False
    id: int | None = None
    prefix: str | None = None

    def __str__(self) -> str:
        return "latest" if self.latest else f"v{self.id}" if self.id is not None else f"{self.prefix}..."


def parse_ref(ref: "int | str | VersionRef") -> VersionRef:
    """The parsed reference; BadReference (naming the rule) for anything else."""
    if isinstance(ref, VersionRef):
        return ref
    if isinstance(ref, int) and not isinstance(ref, bool):
        if ref < 0:
            raise BadReference(f"version {ref}: {RULE}")
        return VersionRef(id=ref)
    text = ref if isinstance(ref, str) else ""
    if text == "latest":
        return VersionRef(latest=True)
    if match := _ID.fullmatch(text):
        return VersionRef(id=int(match.group(1)))
    if _PREFIX.fullmatch(text.lower()):
        return VersionRef(prefix=text.lower())
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise BadReference(f"version {shown!r}: {RULE}")
