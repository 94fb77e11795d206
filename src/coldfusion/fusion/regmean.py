"""RegMean (Jin et al. 2023): per linear layer, the weights that best reproduce every
contributor's outputs on its own inputs; every other tensor is averaged.

For torch's y = x W^T: W = (sum_i W_i G_i) (sum_i G_i)^-1 with G_i = X_i^T X_i, whose
off-diagonal entries are scaled by `alpha` (a ridge toward the plain average).
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from coldfusion.fusion.registry import register, weighted_sum


@register("regmean", needs_stats="gram")
def fuse_regmean(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, stats: Sequence[torch.Tensor] | None,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.9,
) -> torch.Tensor:
    """Linear layers: (sum W_i G_i)(sum G_i)^-1 with off-diagonals of G scaled by alpha; else average."""
    if stats is None:  # not a linear layer's weight: biases, LayerNorm, embeddings
        return weighted_sum(tensors, weights)
    total_gram, total_wg = None, None
    for t, g in zip(tensors, stats, strict=True):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        wg = t.double() @ g
        total_gram = g if total_gram is None else total_gram.add_(g)
        total_wg = wg if total_wg is None else total_wg.add_(wg)
    # W (sum G) = sum W_i G_i  ->  solve (sum G)^T W^T = (sum W_i G_i)^T; G is symmetric
    return torch.linalg.solve(total_gram, total_wg.T).T.float()
