"""Task arithmetic: add the (weighted) sum of task vectors to the base."""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import mixing_weights


@register("task_arithmetic", needs_base=True)
def fuse_task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """b + scale * sum_i w_i (m_i - b); weights sum to 1 when normalize (then scale 1 = average)."""
    b = base.float()
    total = torch.zeros_like(b)
    for w, t in zip(mixing_weights(weights, normalize).tolist(), tensors, strict=True):  # one model at a time
        total.add_(t.float() - b, alpha=w)
    return b + scale * total
