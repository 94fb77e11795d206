"""Checks a contribution must pass before it is fused.

A repository fuses weights sent by other parties, so one bad upload (a crashed
trainer's NaNs, a body of another architecture, an update scaled a hundredfold, by
accident or on purpose) must not reach the next base. Each contribution is read once,
tensor by tensor, against the base it was trained from:

- the exact key set, shapes and dtypes of that base's body;
- finite values only (no NaN or Inf);
- the norm of its delta ||body - base||: at most `max_delta_norm` when set, and at most
  `outlier_factor` times the median of the other contributions' norms (a scaled update
  stands out against its peers, whatever the model's size; needs 2 others).

A contribution that fails gets a reason; the caller records it and fuses the rest.
"""

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from coldfusion.infra.config_files import ConfigSection

if TYPE_CHECKING:
    from coldfusion.io.tensorfile import SafetensorsReader



class ValidationSettings(ConfigSection):
    min_accepted: int = Field(
        1, ge=1, description="fuse only when at least this many contributions pass; else stop with every reason")
    max_delta_norm: float | None = Field(
        None, gt=0, description="reject a contribution whose delta norm ||body - its base|| exceeds this")
    outlier_factor: float | None = Field(
        5.0, gt=1, description="reject a delta norm above this multiple of the median of the others' "
                               "(applies with at least 2 others); null: off")
    stale: Literal["rebase", "reject"] = Field(
        "rebase", description="a contribution trained from an older base: fuse its delta on the current base "
                              "(rebase), or reject it")
    max_staleness: int | None = Field(
        None, ge=0, description="reject a contribution trained from a base more than this many versions behind "
                                "the current one (or from a base not in its lineage); null: no bound")
    staleness_exponent: float = Field(
        0.0, ge=0, description="weigh a contribution s versions behind by (1 + s)^-a (FedAsync's polynomial "
                               "staleness function) on top of the operator's weights; 0: off")


@dataclass(frozen=True)
class Inspection:
    """What one read of a contribution found: a reason to reject it, or its delta norm."""

    problem: str | None
    delta_norm: float = math.nan


def inspect_contribution(body: "SafetensorsReader", base: "SafetensorsReader") -> Inspection:
    """Structure and values of `body` against the `base` it was trained from, one tensor at a time."""
    import torch  # here: the settings above are read by configs that must load fast

    keys, expected = body.keys(), base.keys()
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        parts = [f"{len(missing)} missing tensors {missing[:3]}" if missing else "",
                 f"{len(extra)} unexpected tensors {extra[:3]}" if extra else ""]
        return Inspection(f"not the base's architecture: {'; '.join(p for p in parts if p)}")
    for name in sorted(keys):
        if body.layout(name) != base.layout(name):
            (dtype, shape), (base_dtype, base_shape) = body.layout(name), base.layout(name)
            return Inspection(f"tensor '{name}' is {str(dtype).removeprefix('torch.')} {list(shape)}, "
                              f"the base's is {str(base_dtype).removeprefix('torch.')} {list(base_shape)}")
    squares = 0.0
    for name in sorted(keys):
        values = body.read(name)
        if not values.dtype.is_floating_point:
            if not torch.equal(values, base.read(name)):
                return Inspection(f"integer tensor '{name}' differs from the base's")
            continue
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            return Inspection(f"tensor '{name}' has {bad} non-finite values (NaN or Inf)")
        delta = values.double() - base.read(name).double()
        squares += float(delta.square().sum())
    return Inspection(None, math.sqrt(squares))


def norm_outliers(norms: Mapping[int, float], settings: ValidationSettings) -> dict[int, str]:
    """Contributions whose delta norm breaks the bound or stands out from the others'."""
    rejected = {}
    for key, norm in norms.items():
        if settings.max_delta_norm is not None and norm > settings.max_delta_norm:
            rejected[key] = f"delta norm {norm:.4g} exceeds max_delta_norm {settings.max_delta_norm:.4g}"
            continue
        others = [n for k, n in norms.items() if k != key]
        if settings.outlier_factor is not None and len(others) >= 2:
            typical = statistics.median(others)
            if norm > settings.outlier_factor * typical:
                times = f"{norm / typical:.1f}x" if typical > 0 else "above zero, unlike"
                rejected[key] = (f"delta norm {norm:.4g} is {times} the median of the other contributions' "
                                 f"({typical:.4g}); the bound is outlier_factor = {settings.outlier_factor:g}")
    return rejected
