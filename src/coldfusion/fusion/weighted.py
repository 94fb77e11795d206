"""Average weighted by each contributor's number of training examples."""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register, weighted_sum


@register("weighted", weighting="examples", elementwise=True)
def fuse_weighted(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """average with w_i = number of training examples of contributor i."""
    return weighted_sum(tensors, weights)
