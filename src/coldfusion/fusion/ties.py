"""TIES merging (Yadav et al. 2023; docs/METHODS.md section 2): trim, elect sign, disjoint mean.

The trim keeps each task vector's largest magnitudes over the whole tensor, so for a
large tensor the engine first finds each model's cut (`prepare`) and then merges slice by
slice; when all models' tensors fit in the engine's buffer, each is read once and merged
from memory.

Two implementations give the same bits. The plain one below is torch, readable, and always
there. With numba installed (the `fast` extra, which `make` installs), the compiled loops
of ties_kernel.py run instead: one pass over the data where torch makes about a dozen, and
a cut found by bracketing a sample instead of a full selection (benchmarks/fusion_speed.py).
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from coldfusion.fusion.parallel import parallel_map
from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import stack_float


@dataclass(frozen=True)
class MagnitudeCut:
    """The entries TIES keeps of one flattened task vector: the k = max(1, floor(density *
    size)) largest magnitudes (mergekit's k). Exactly k: among entries whose magnitude
    equals the k-th largest (`value`), those at flat positions <= `last_tie` are kept.
    (mergekit breaks such ties by an unstable sort, i.e. arbitrarily.)
    """

    value: float
    last_tie: int


@functools.cache
def compiled() -> bool:
    """Whether the compiled loops can run (numba is installed)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def plain_cut(delta: torch.Tensor, density: float) -> MagnitudeCut:
    """The cut of one task vector (any shape; positions are those of its flattening), by a
    full selection."""
    magnitude = delta.detach().float().flatten().abs()
    n = magnitude.numel()
    if density >= 1.0:
        return MagnitudeCut(-math.inf, n)
    if density <= 0 or n == 0:
        return MagnitudeCut(math.inf, -1)
    k = max(1, int(density * n))
    value = float(torch.kthvalue(magnitude, n - k + 1).values)  # the k-th largest
    at_cut = torch.nonzero(magnitude == value).flatten()
    ties_needed = k - int((magnitude > value).sum())
    if value == 0.0 or ties_needed == at_cut.numel():  # every entry at the cut is kept
        return MagnitudeCut(value, n)
    return MagnitudeCut(value, int(at_cut[ties_needed - 1]))


def plain_merge(models: torch.Tensor, base: torch.Tensor, cuts: Sequence[MagnitudeCut], weights: torch.Tensor,
                offset: int = 0, normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    """base + scale * TIES-merge of the task vectors `models[i] - base` (float32 (n, length)
    and (length,), flat slices starting at flat position `offset`), each trimmed by its cut.
    Sums run model by model, in order, as the compiled loop runs them: the same bits."""
    base = base.float()
    positions = torch.arange(offset, offset + models.shape[1])
    plus, plus_mass, minus, minus_mass = (torch.zeros_like(base) for _ in range(4))
    zero = torch.zeros((), dtype=torch.float32)
    for row, cut, w in zip(models, cuts, weights.float(), strict=True):
        d = row - base
        value = torch.tensor(cut.value, dtype=torch.float32)
        threshold = torch.where(positions <= cut.last_tie, torch.nextafter(value, value.new_tensor(-math.inf)),
                                value)  # ties at positions up to last_tie are kept
        kept = d.abs() > threshold
        up, down = kept & (d > 0), kept & (d < 0)
        plus += torch.where(up, w * d, zero)
        plus_mass += torch.where(up, w, zero)
        minus += torch.where(down, w * d, zero)
        minus_mass += torch.where(down, w, zero)
    elected_plus = plus + minus >= 0  # a tie goes to +, as in mergekit
    total = torch.where(elected_plus, plus, minus)
    if normalize:
        mass = torch.where(elected_plus, plus_mass, minus_mass)
        total = torch.where(mass > 0, total / mass, zero)
    return base + torch.tensor(scale, dtype=torch.float32) * total


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float, workers: int = 1) -> list:
    """Each model's MagnitudeCut of its whole task vector."""
    if compiled():
        from coldfusion.fusion import ties_kernel

        return ties_kernel.magnitude_cuts(tensors, base, density, workers)
    flat_base = base.float().flatten()
    return [plain_cut(tensors[i].float().flatten() - flat_base, density) for i in range(len(tensors))]


@register("ties", needs_base=True, elementwise=True, prepare=magnitude_cuts, compute_bound=True)
def fuse_ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    offset: int = 0, prepared: Sequence | None = None, workers: int = 1,
    density: Annotated[float, Field(gt=0, le=1)] = 0.2, scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """Keep each task vector's top `density` magnitudes, elect signs, average agreeing entries."""
    models, flat_base = stack_float(tensors).flatten(1), base.flatten()
    if not compiled():
        prepared = prepared or magnitude_cuts(models, flat_base, density)
        return plain_merge(models, flat_base, prepared, weights, offset, normalize, scale).view_as(base)
    from coldfusion.fusion.ties_kernel import model_cut, ties_merge

    if prepared is None:  # whole tensors, all in memory: cut each from the same read
        b = flat_base.float().contiguous().numpy()
        prepared = parallel_map(lambda row: model_cut(row.numpy(), b, density), models, workers)
    return ties_merge(models, flat_base, prepared, weights, offset, normalize, scale, workers=workers).view_as(base)
