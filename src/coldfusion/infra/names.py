"""Names that become directory and file names: runs, tasks, contributors.

A name from a config or a command line is joined onto a path (runs/NAME, heads/RUN/NAME),
so it must stay one plain path component: letters, digits, '_', '-' and '.', starting
with a letter or digit (never '..', never hidden, never a separator).
"""

import re
from typing import Annotated

from pydantic import AfterValidator

from coldfusion.infra.errors import ColdFusionError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RULE = "use 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit"


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is one safe path component; else an error that says what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ColdFusionError(f"{what} {name!r} cannot name a file or directory: {RULE}")
    return name


def _validate(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"cannot name a file or directory: {RULE}")
    return name


SafeName = Annotated[str, AfterValidator(_validate)]
