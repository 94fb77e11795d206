"""Uniform average: the ColD Fusion default."""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register, weighted_sum


@register("average", elementwise=True)
def fuse_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i m_i / sum_i w_i with uniform w_i unless weights are given."""
    return weighted_sum(tensors, weights)
