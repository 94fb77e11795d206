"""Shared pieces of the task-vector operators (task arithmetic, TIES, DARE).

A task vector is t_i = m_i - b. These helpers act on one tensor's task vectors.
"""

from collections.abc import Sequence

import torch


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Stack t_i = m_i - b as float32, shape (n, *base.shape)."""
    b = base.float()
    return torch.stack([t.float() - b for t in tensors])


def mixing_weights(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    return weights / weights.sum() if normalize else weights


def keep_top_magnitudes(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the max(1, floor(density * size)) largest-magnitude entries of one task vector.

    (mergekit's rounding, so that the same config gives the same merge in both tools.)
    """
    if density >= 1.0:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    idx = flat.abs().topk(k).indices
    kept[idx] = flat[idx]
    return kept.view_as(delta)


def sign_consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES: elect a sign per entry by total weighted mass, merge the entries that agree.

    `deltas` is (n, ...). The elected sign is + where the weighted sum is >= 0 (ties go
    to +, as in mergekit). With `normalize`, the result is the weighted mean over the
    contributors whose entry is non-zero with the elected sign (0 where none is);
    without, their weighted sum.
    """
    w = weights.view(-1, *([1] * (deltas.dim() - 1)))
    elected = torch.where((w * deltas).sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected  # a zero entry has sign 0: never agrees
    merged = (w * deltas * agree).sum(0)
    if not normalize:
        return merged
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, merged / mass.clamp(min=1e-12), torch.zeros_like(merged))
