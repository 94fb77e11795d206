"""Shared pieces of the task-vector operators (task arithmetic, TIES, DARE).

A task vector is t_i = m_i - b. These helpers act on one tensor's task vectors (or on
the same flat slice of each).
"""

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """t_i = m_i - b as float32, shape (n, *base.shape), computed straight into one buffer."""
    b = base.float()
    out = torch.empty((len(tensors), *b.shape))
    for i, t in enumerate(tensors):
        torch.sub(t.float(), b, out=out[i])
    return out


def mixing_weights(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    return weights / weights.sum() if normalize else weights


@dataclass(frozen=True)
class MagnitudeCut:
    """The entries TIES keeps of one flattened task vector: the k = max(1, floor(density *
    size)) largest magnitudes (mergekit's k). Exactly k: among entries whose magnitude
    equals the k-th largest (`value`), those at flat positions <= `last_tie` are kept.
    (mergekit breaks such ties by an unstable sort, i.e. arbitrarily.)
    """

    value: float
    last_tie: int


def magnitude_cut(delta: torch.Tensor, density: float) -> MagnitudeCut:
    """Where to cut one task vector (any shape; positions are those of its flattening)."""
    magnitudes = lambda: delta.detach().float().flatten().abs()  # noqa: E731
    return _cut(magnitudes(), density, magnitudes)


def _cut(magnitude: torch.Tensor, density: float, magnitudes_again: Callable[[], torch.Tensor]) -> MagnitudeCut:
    """The cut from a flat float32 buffer of magnitudes, which it scrambles. In the rare
    case that ties straddle the cut, their positions come from `magnitudes_again()`."""
    n = magnitude.numel()
    if density >= 1.0:
        return MagnitudeCut(-math.inf, n)
    if density <= 0 or n == 0:
        return MagnitudeCut(math.inf, -1)
    k = max(1, int(density * n))
    # numpy's introselect finds the k-th largest in linear time, in place (torch.kthvalue is slower and copies)
    scratch = magnitude.numpy()
    scratch.partition(n - k)
    value = float(scratch[n - k])
    if value == 0.0 or n == k or scratch[: n - k].max() < value:  # every entry at the cut is kept
        return MagnitudeCut(value, n)
    ties_needed = k - int(np.count_nonzero(scratch[n - k + 1:] > value))
    del scratch, magnitude
    ties = torch.nonzero(magnitudes_again() == value).flatten()
    return MagnitudeCut(value, int(ties[ties_needed - 1]))


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float) -> list[MagnitudeCut]:
    """The cut of every model's whole task vector. The selection is most of TIES's time, so
    two models are cut at once (torch and numpy release the GIL), each in one buffer: its
    own read when `tensors` hands out fresh buffers (the engine's lazy reads do)."""
    b = base.float().flatten()
    fresh = getattr(tensors, "fresh", False)

    def magnitudes(i: int) -> torch.Tensor:
        t = tensors[i].flatten()
        owned = fresh or t.dtype != torch.float32
        return (t.float().sub_(b) if owned else t - b).abs_()

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda i: _cut(magnitudes(i), density, lambda: magnitudes(i)), range(len(tensors))))


def trim(deltas: torch.Tensor, cuts: Sequence[MagnitudeCut], offset: int = 0) -> torch.Tensor:
    """Zero, in place, the entries of task vectors (n, length) outside their cuts; `offset`
    is the flat position of column 0 (the engine passes slices)."""
    length = deltas.shape[1]
    magnitude = deltas.abs()
    # One comparison for the whole slice: drop `<= value`, or `< value` (`<= nextafter(value,
    # -inf)`) where every tie in the slice is kept.
    value = torch.tensor([c.value for c in cuts]).unsqueeze(1)
    all_ties = torch.tensor([offset + length - 1 <= c.last_tie for c in cuts]).unsqueeze(1)
    drop = magnitude <= torch.where(all_ties, torch.nextafter(value, torch.tensor(-math.inf)), value)
    for i, cut in enumerate(cuts):  # rare: the last kept tie falls inside this slice
        if offset <= cut.last_tie < offset + length - 1:
            positions = torch.arange(offset, offset + length)
            drop[i] &= ~((magnitude[i] == cut.value) & (positions <= cut.last_tie))
    return deltas.masked_fill_(drop, 0.0)


def sign_consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES: elect a sign per entry by total weighted mass, merge the entries that agree.

    `deltas` is (n, length). The elected sign is + where the weighted sum is >= 0 (ties
    go to +, as in mergekit). With `normalize`, the result is the weighted mean over the
    contributors whose entry is non-zero with the elected sign (0 where none is);
    without, their weighted sum.
    """
    # Written as matrix-vector products over few full passes: with s = sign(d), the
    # positive part of d is (d + |d|) / 2 and the indicator of d > 0 is (|s| + s) / 2.
    w = weights.float()
    total = w @ deltas
    positive = (total + w @ deltas.abs()) / 2
    elected_plus = total >= 0
    merged = torch.where(elected_plus, positive, total - positive)
    if not normalize:
        return merged
    sign = torch.sign(deltas)
    signed_mass = w @ sign
    mass = (w @ sign.abs_() + torch.where(elected_plus, signed_mass, -signed_mass)) / 2
    return torch.where(mass > 0, merged / mass.clamp(min=1e-12), torch.zeros_like(merged))
