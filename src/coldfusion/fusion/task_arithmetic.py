"""Task arithmetic: add the (weighted) sum of task vectors to the base."""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import add_task_vectors, mixing_weights


@register("task_arithmetic", needs_base=True, elementwise=True)
def fuse_task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """b + scale * sum_i w_i (m_i - b); weights sum to 1 when normalize (then scale 1 = average)."""
    w = mixing_weights(weights, normalize) * scale
    return add_task_vectors(tensors, w.tolist(), base)
