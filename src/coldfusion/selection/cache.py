"""Keys for results cached in a repository: a digest of everything the result depends on.

Scoring a candidate or finetuning on a pair is deterministic given its inputs and
settings, so a result computed once is reused by every later `rank`, `select` or harness
run, and an interrupted run resumes where it stopped. Each cached value keeps the
seconds it cost, so reports give the true cost even when it was cached.
"""

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from coldfusion.infra.paths import cache_root

if TYPE_CHECKING:  # the CLI imports this module for its defaults; tasks would pull in torch and pandas
    from coldfusion.tasks import Split


def digest(kind: str, **parts) -> str:
    text = json.dumps({"kind": kind, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def precision_part(precision: str) -> dict:
    """A key part for results computed in `precision`; none for fp32, so results cached
    before precisions were chosen stay valid."""
    return {} if precision == "fp32" else {"precision": precision}


def split_fingerprint(split: "Split") -> str:
    """Of the examples themselves: a task file edited since gets new keys."""
    h = hashlib.sha256()
    for column in (split.texts, split.pairs or [], split.labels):
        h.update(json.dumps(column).encode())
    return h.hexdigest()


def default_cache() -> Path:
    """Where `rank` and `select` keep what they computed: $COLDFUSION_CACHE/selection, else
    ~/.cache/coldfusion/selection (a coldfusion repository)."""
    return cache_root() / "selection"
