"""Failpoints: named places where crash-safety tests kill this process on purpose.

`COLDFUSION_KILL_AT=NAME` (or `NAME:K`, the K-th arrival) makes `failpoint(NAME)` send
SIGKILL to its own process: no `finally`, no `atexit`, no flush, as when the machine
loses power or the OOM killer strikes. Tests put it at the moments that matter (mid-
training, mid-fusion, a checkpoint half written, a file written but not yet indexed)
and then check that nothing was lost and that `--resume` finishes the run. Unset, which
is always the case outside such tests, a failpoint costs one environment lookup.
"""

import os
import signal

POINTS = {
    "training.step": "after an optimizer step of a contributor's finetuning",
    "fusion.tensor": "before each tensor of a fusion (the second arrival: one tensor fused)",
    "checkpoint.partial": "with half of a checkpoint's bytes in its temporary file",
    "checkpoint.unrenamed": "with a checkpoint complete in its temporary file, before the rename",
    "repository.unindexed": "with a checkpoint stored, before the index transaction commits",
    "loop.unrecorded": "with an iteration's version stored, before the run's state records it",
}
_arrivals: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    value = os.environ.get("COLDFUSION_KILL_AT")
    if not value:
        return None
    point, _, nth = value.partition(":")
    if point not in POINTS or not (nth or "1").isdigit():
        raise ValueError(f"COLDFUSION_KILL_AT={value}: expected NAME or NAME:K with NAME one of {sorted(POINTS)}")
    return point, int(nth or 1)


_target()  # a misspelt point fails when the process starts, not silently never


def failpoint(name: str) -> None:
    target = _target()
    if target is None or target[0] != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
