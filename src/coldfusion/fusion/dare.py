"""DARE (Yu et al. 2024): drop task-vector entries at random, rescale the rest, then merge.

`density` is the keep probability (1 - p of the paper, as mergekit spells it). The mask
is drawn in blocks of BLOCK entries of the flattened tensor, each from a seed derived
from `seed`, the tensor's name, the block and the contributor: the same seed gives the
same fusion however the engine slices the tensor.
"""

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import mixing_weights, sign_consensus_merge, task_vectors
from coldfusion.infra.runtime import derive_seed

BLOCK = 1 << 14  # divides the engine's slice: no draw is wasted


def keep_mask(numel: int, offset: int, density: float, seed: int, name: str, contributor: int) -> torch.Tensor:
    """Which of the flat entries [offset, offset + numel) survive the drop."""
    if numel == 0:
        return torch.ones(0, dtype=torch.bool)
    first, last = offset // BLOCK, (offset + numel - 1) // BLOCK
    draws = torch.cat([torch.rand(BLOCK, generator=torch.Generator().manual_seed(
        derive_seed(seed, "dare", name, block, contributor))) for block in range(first, last + 1)])
    start = offset - first * BLOCK
    return draws[start:start + numel] < density


@register("dare", needs_base=True, elementwise=True)
def fuse_dare(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor, name: str = "", offset: int = 0,
    density: Annotated[float, Field(gt=0, le=1)] = 0.5, variant: Literal["linear", "ties"] = "linear",
    scale: float = 1.0, normalize: bool = True, seed: int = 0,
) -> torch.Tensor:
    """Random drop + rescale of each task vector, then task arithmetic (linear) or TIES sign consensus."""
    deltas = task_vectors(tensors, base).flatten(1)
    if density < 1.0:
        for i, delta in enumerate(deltas):
            delta.mul_(keep_mask(delta.numel(), offset, density, seed, name, i)).div_(density)
    if variant == "linear":
        merged = mixing_weights(weights, normalize) @ deltas
    else:
        merged = sign_consensus_merge(deltas, weights, normalize)
    return base.float() + scale * merged.view_as(base)
