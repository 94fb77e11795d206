"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import keep_top_magnitudes, sign_consensus_merge, task_vectors


@register("ties", needs_base=True)
def fuse_ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    density: float = 0.2, scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """Keep each task vector's top `density` magnitudes, elect signs, average agreeing entries."""
    deltas = torch.stack([keep_top_magnitudes(d, density) for d in task_vectors(tensors, base)])
    return base.float() + scale * sign_consensus_merge(deltas, weights, normalize)
