"""Shared pieces of the task-vector operators (task arithmetic, TIES, DARE).

A task vector is t_i = m_i - b. These helpers act on one tensor's task vectors (or on
the same flat slice of each).
"""

from collections.abc import Iterator, Sequence

import torch


def stack_float(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float32 (n, *shape) tensor; the engine's lazy reads go straight into it."""
    stacked = getattr(tensors, "stacked", None)
    return stacked() if stacked else torch.stack([t.float() for t in tensors])


def each_float(tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The tensors one at a time as float32, for an operator that uses each once and keeps
    none: the engine reads them all into one reused buffer (no allocation per model)."""
    streamed = getattr(tensors, "streamed", None)
    return streamed() if streamed else (t.float() for t in tensors)


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """t_i = m_i - b as float32, shape (n, *base.shape), in the one stacked buffer."""
    return stack_float(tensors).sub_(base.float())


def add_task_vectors(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor) -> torch.Tensor:
    """b + sum_i w_i (m_i - b) in float32, reading one model at a time, without temporaries."""
    b = base.float()
    total = torch.zeros_like(b)
    for wi, t in zip(weights, each_float(tensors), strict=True):
        total.add_(t, alpha=wi)
    # sum_i w_i (m_i - b) = sum_i w_i m_i - (sum_i w_i) b
    return total.add_(b, alpha=1 - float(sum(weights)))


def mixing_weights(weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    return weights / weights.sum() if normalize else weights


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
