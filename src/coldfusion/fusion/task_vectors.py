"""Shared pieces of the task-vector operators (task arithmetic, TIES, DARE).

A task vector is t_i = m_i - b. These helpers act on one tensor's task vectors.
"""

import math
from collections.abc import Sequence

import torch


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Stack t_i = m_i - b as float32, shape (n, *base.shape)."""
    b = base.float()
    return torch.stack([t.float() - b for t in tensors])


def mixing_weights(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    return weights / weights.sum() if normalize else weights


def keep_top_magnitudes(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density * size) largest-magnitude entries of one task vector."""
    if density >= 1.0:
        return delta
    k = math.ceil(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    idx = flat.abs().topk(k).indices
    kept[idx] = flat[idx]
    return kept.view_as(delta)


def sign_consensus_merge(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES: elect a sign per entry by total weighted mass, average the entries that agree.

    `deltas` is (n, ...); the result is the weighted mean over the contributors whose
    entry is non-zero and has the elected sign (0 where none does).
    """
    w = weights.view(-1, *([1] * (deltas.dim() - 1)))
    elected = torch.sign((w * deltas).sum(0))
    agree = (torch.sign(deltas) == elected) & (deltas != 0)
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, (w * deltas * agree).sum(0) / mass.clamp(min=1e-12), torch.zeros_like(mass))
