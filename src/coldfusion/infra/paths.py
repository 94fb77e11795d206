"""Where coldfusion keeps what it may compute or download again: $COLDFUSION_CACHE, else
~/.cache/coldfusion (one root; each user of it has its own folder under it)."""

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("COLDFUSION_CACHE") or Path.home() / ".cache" / "coldfusion")
