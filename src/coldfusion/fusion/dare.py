"""DARE (Yu et al. 2024): drop task-vector entries at random, rescale the rest, then merge.

`density` is the keep probability (1 - p of the paper, as mergekit spells it). The mask
of each (tensor, contributor) pair is drawn from a seed derived from `seed` and the
tensor's name, so a fusion is reproducible.
"""

from collections.abc import Sequence

import torch

from coldfusion.errors import ColdFusionError
from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import mixing_weights, sign_consensus_merge, task_vectors
from coldfusion.runtime import derive_seed


def drop_and_rescale(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed)) < density
    return delta * keep / density


@register("dare", needs_base=True)
def fuse_dare(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor, name: str = "",
    density: float = 0.5, variant: str = "linear", scale: float = 1.0, normalize: bool = True, seed: int = 0,
) -> torch.Tensor:
    """Random drop + rescale of each task vector, then task arithmetic (linear) or TIES sign consensus."""
    if not 0.0 < density <= 1.0:
        raise ColdFusionError(f"dare: density must be in (0, 1], not {density}")
    w = mixing_weights(weights, normalize)
    deltas = torch.stack([drop_and_rescale(d, density, derive_seed(seed, "dare", name, i))
                          for i, d in enumerate(task_vectors(tensors, base))])
    if variant == "linear":
        merged = (w.view(-1, *([1] * (deltas.dim() - 1))) * deltas).sum(0)
    elif variant == "ties":
        merged = sign_consensus_merge(deltas, weights, normalize)
    else:
        raise ColdFusionError(f"dare: variant must be 'linear' or 'ties', not '{variant}'")
    return base.float() + scale * merged
