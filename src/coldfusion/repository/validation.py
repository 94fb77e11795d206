"""The operator's rules for contributions, and the one inspection of a body against its base.

A repository fuses weights sent by other parties, so one bad upload (a crashed trainer's
NaNs, a body of another architecture, an update scaled a thousandfold, by accident or on
purpose) must not reach the next base. Admission (intake.py) applies these rules once, as
a contribution arrives, whatever door it came through:

- the exact key set, shapes and dtypes of its base's body; finite values; integer tensors
  unchanged;
- a real update: its delta ||body - base|| is not zero;
- a bounded delta: at most `base_norm_factor` times the base's own norm (an update half the
  size of the whole model is no finetune), so the first contribution, and a fusion of one,
  are protected too; at most `outlier_factor` times the median delta norm of
  the last `norm_history` contributions admitted along the base's lineage, once 3 exist; at
  most `max_delta_norm` when set;
- at most `max_examples` declared examples (they weigh `weighted` fusion).

The fusion (fusion_pipeline.py) then applies only what depends on the base it fuses onto:
`stale`, `max_staleness`, `staleness_exponent`, `min_accepted`.
"""

import math
import statistics
from collections.abc import Mapping, Sequence
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
        None, gt=0, description="refuse a contribution whose delta norm ||body - its base|| exceeds this")
    outlier_factor: float | None = Field(
        5.0, gt=1, description="refuse a delta norm above this multiple of the median of the contributions "
                               "admitted before it along the base's lineage (once 3 exist); null: off")
    norm_history: int = Field(20, ge=3, description="how many of the latest admitted contributions that median "
                                                     "is taken over")
    base_norm_factor: float | None = Field(
        0.5, gt=0, description="refuse a delta norm above this multiple of the base's own norm (the one norm rule "
                               "until 3 contributions are admitted; a base of zeros has none); null: off")
    max_examples: int = Field(
        10_000_000, ge=1, description="refuse a contribution that declares more training examples than this (the "
                                      "count weighs 'weighted' fusion)")
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
    """What one read of a body against its base found: the rule it breaks and why, or its
    delta norm (and the base's norm, which bounds the first updates)."""

    problem: str | None
    delta_norm: float = math.nan
    base_norm: float = math.nan
    rule: str | None = None


class InMemory:
    """Tensors in memory, read the way SafetensorsReader reads a file (keys, layout, read)."""

    def __init__(self, tensors: Mapping):
        self.tensors = tensors

    def keys(self) -> set[str]:
        return set(self.tensors)

    def layout(self, name: str):
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def read(self, name: str):
        return self.tensors[name].reshape(-1)


class Inspector:
    """The inspection of a body against the base it was trained from, fed the body's layout
    (names, dtypes, shapes) and then its tensors one at a time, in any order: from a file
    (`inspect_contribution`) or as an upload's bytes arrive (intake.StreamedInspection). The
    first fault found stands; norms in fp32, accumulated in fp64 across tensors."""

    def __init__(self, base: "SafetensorsReader | InMemory", base_norm: float | None = None):
        self.base, self.known_base_norm = base, base_norm
        self.found: Inspection | None = None  # the first fault
        self.squares, self.base_squares, self.seen = 0.0, 0.0, set()

    def layout(self, layouts: Mapping) -> None:
        """`layouts`: name -> (torch dtype, shape) of every tensor of the body."""
        keys, expected = set(layouts), self.base.keys()
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            parts = [f"{len(missing)} missing tensors {missing[:3]}" if missing else "",
                     f"{len(extra)} unexpected tensors {extra[:3]}" if extra else ""]
            self.found = Inspection(f"not the base's architecture: {'; '.join(p for p in parts if p)}",
                                    rule="architecture")
            return
        for name in sorted(keys):
            if tuple(layouts[name]) != tuple(self.base.layout(name)):
                (dtype, shape), (base_dtype, base_shape) = layouts[name], self.base.layout(name)
                self.found = Inspection(f"tensor '{name}' is {str(dtype).removeprefix('torch.')} {list(shape)}, "
                                        f"the base's is {str(base_dtype).removeprefix('torch.')} "
                                        f"{list(base_shape)}", rule="architecture")
                return

    def tensor(self, name: str, values) -> None:
        """One tensor's values (any shape), checked against the base's and measured."""
        import torch  # here: the settings above are read by configs that must load fast

        if self.found is not None:
            return
        values, reference = values.reshape(-1), self.base.read(name)
        self.seen.add(name)
        if not values.dtype.is_floating_point:
            if not torch.equal(values, reference):
                self.found = Inspection(f"integer tensor '{name}' differs from the base's", rule="integers")
            return
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            self.found = Inspection(f"tensor '{name}' has {bad} non-finite values (NaN or Inf)", rule="finite")
            return
        reference = reference.float()
        self.squares += float(torch.linalg.vector_norm(values.float() - reference)) ** 2
        if self.known_base_norm is None:
            self.base_squares += float(torch.linalg.vector_norm(reference)) ** 2

    def result(self) -> Inspection:
        if self.found is not None:
            return self.found
        if self.seen != self.base.keys():  # (a caller that stopped early)
            return Inspection(f"tensors {sorted(self.base.keys() - self.seen)[:3]} were never read", rule="format")
        base_norm = math.sqrt(self.base_squares) if self.known_base_norm is None else self.known_base_norm
        return Inspection(None, math.sqrt(self.squares), base_norm)


def inspect_contribution(body: "SafetensorsReader | InMemory", base: "SafetensorsReader | InMemory",
                         base_norm: float | None = None) -> Inspection:
    """Structure and values of `body` against the `base` it was trained from, one tensor at a
    time; `base_norm`: the base's norm, if known (else measured here too)."""
    inspector = Inspector(base, base_norm)
    inspector.layout({name: body.layout(name) for name in body.keys()})
    for name in sorted(body.keys()):
        if inspector.found is not None:
            break
        inspector.tensor(name, body.read(name))
    return inspector.result()


def norm_problem(norm: float, admitted: Sequence[float], base_norm: float, settings: ValidationSettings) -> str | None:
    """Why a delta norm is out of bounds, given the norms of the contributions admitted before
    it along the same lineage (newest first) and the norm of its base; None if it is within."""
    if norm == 0:
        return "no-op: the update is empty (the body equals its base)"
    if settings.max_delta_norm is not None and norm > settings.max_delta_norm:
        return f"delta norm {norm:.4g} exceeds max_delta_norm {settings.max_delta_norm:.4g}"
    if settings.base_norm_factor is not None and base_norm > 0 and norm > settings.base_norm_factor * base_norm:
        return (f"delta norm {norm:.4g} is {norm / base_norm:.3g}x the base's own norm "
                f"({base_norm:.4g}); the bound is base_norm_factor = {settings.base_norm_factor:g}")
    recent = list(admitted)[:settings.norm_history]
    if settings.outlier_factor is not None and len(recent) >= 3:
        typical = statistics.median(recent)
        if norm > settings.outlier_factor * typical:
            times = f"{norm / typical:.1f}x" if typical > 0 else "above zero, unlike"
            return (f"delta norm {norm:.4g} is {times} the median of the {len(recent)} contributions admitted "
                    f"before it ({typical:.4g}); the bound is outlier_factor = {settings.outlier_factor:g}")
    return None
