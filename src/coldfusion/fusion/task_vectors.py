"""Shared pieces of the task-vector operators (task arithmetic, TIES, DARE).

A task vector is t_i = m_i - b. These helpers act on one tensor's task vectors (or on
the same flat slice of each).
"""

import math
from collections.abc import Sequence
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

    def keep(self, delta: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Boolean mask over a flat slice of the task vector that starts at `offset`."""
        magnitude = delta.abs()
        kept = magnitude > self.value
        if offset <= self.last_tie:
            at_cut = magnitude == self.value
            if offset + delta.numel() - 1 > self.last_tie:
                at_cut &= torch.arange(offset, offset + delta.numel()) <= self.last_tie
            kept |= at_cut
        return kept


def magnitude_cut(delta: torch.Tensor, density: float) -> MagnitudeCut:
    """Where to cut one task vector (any shape; positions are those of its flattening)."""
    n = delta.numel()
    if density >= 1.0:
        return MagnitudeCut(-math.inf, n)
    if density <= 0 or n == 0:
        return MagnitudeCut(math.inf, -1)
    k = max(1, int(density * n))
    magnitude = delta.detach().float().flatten().abs()
    # numpy's introselect finds the k-th largest in linear time, several times faster than torch.kthvalue
    value = float(np.partition(magnitude.numpy(), n - k)[n - k])
    if value == 0.0:  # zero entries never join a sign consensus: keeping them changes nothing
        return MagnitudeCut(0.0, n)
    ties_needed = k - int((magnitude > value).sum())
    ties = torch.nonzero(magnitude == value).flatten()
    return MagnitudeCut(value, int(ties[ties_needed - 1]))


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float) -> list[MagnitudeCut]:
    """The cut of every model's whole task vector, one model in memory at a time."""
    b = base.float()
    return [magnitude_cut(t.float() - b, density) for t in tensors]


def sign_consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES: elect a sign per entry by total weighted mass, merge the entries that agree.

    `deltas` is (n, ...). The elected sign is + where the weighted sum is >= 0 (ties go
    to +, as in mergekit). With `normalize`, the result is the weighted mean over the
    contributors whose entry is non-zero with the elected sign (0 where none is);
    without, their weighted sum.
    """
    w = weights.view(-1, *([1] * (deltas.dim() - 1)))
    weighted = w * deltas
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected  # a zero entry has sign 0: never agrees
    merged = (weighted * agree).sum(0)
    if not normalize:
        return merged
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, merged / mass.clamp(min=1e-12), torch.zeros_like(merged))
