"""`sparse`: only the top `density` share of all delta entries, as (indices, values) per tensor.

The entries are chosen over the whole body at once: a tensor the task barely touched
sends few or none. By `magnitude`, the largest |delta| after finetuning. By `fisher`, a
FISH mask (Sung et al. 2021): the contributor ranks entries by its diagonal Fisher on the
base *before* finetuning and trains only those (`restrict_training`), so what it sends is
its whole update, not a cut of it. An entry not sent is a zero delta: decoding gives
base + sent deltas, and every fusion operator sees an ordinary body. Each kept entry
costs 4 bytes of int32 index and 2 of fp16 value: density d sends about 6d / 4 of the
full body's bytes.
"""

import torch

from coldfusion.encodings.delta import DTYPES
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors

INDICES, VALUES = ".indices", ".values"


def top_share(scores: Tensors, density: float) -> dict[str, torch.Tensor]:
    """Flat indices, per tensor, of the top `density` share of all entries by score."""
    names = sorted(scores)
    ranking = torch.cat([scores[k].float().flatten() for k in names])
    kept = torch.zeros(ranking.numel(), dtype=torch.bool)
    kept[torch.topk(ranking, max(1, round(density * ranking.numel())), sorted=False).indices] = True
    out, start = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = kept[start:start + n].nonzero().flatten()
        start += n
    return out


class TrainingRestriction:
    """Finetuning that changes only the entries in `indices` (a FISH mask), whatever the optimizer.

    Gradients outside the mask are zeroed (Adam's moments stay zero there), and since
    decoupled weight decay still moves every entry, the entries outside the mask are put
    back to their values before every forward pass of the body and once more on `remove()`.
    """

    def __init__(self, body: torch.nn.Module, indices: dict[str, torch.Tensor]):
        self._kept = []  # (parameter, mask of its trained entries, its values before training)
        self._hooks = []
        for name, param in body.named_parameters():
            mask = torch.zeros(param.numel(), dtype=torch.bool)
            mask[indices.get(name, torch.zeros(0, dtype=torch.long))] = True
            mask = mask.to(param.device).view_as(param)
            self._kept.append((param, mask, param.detach().clone()))
            self._hooks.append(param.register_hook(lambda grad, m=mask: grad * m))
        self._hooks.append(body.register_forward_pre_hook(lambda module, args: self.restore()))

    @torch.no_grad()
    def restore(self) -> None:
        for param, mask, frozen in self._kept:
            param.copy_(torch.where(mask, param, frozen))

    def remove(self) -> None:
        self.restore()
        for hook in self._hooks:
            hook.remove()
        self._kept, self._hooks = [], []


def restrict_training(body: torch.nn.Module, indices: dict[str, torch.Tensor]) -> TrainingRestriction:
    """Train only the entries in `indices` until the returned restriction is `remove()`d."""
    return TrainingRestriction(body, indices)


def sparse_payload(body: Tensors, base: Tensors, indices: dict[str, torch.Tensor], dtype: str) -> Tensors:
    payload = {}
    for name, where in sorted(indices.items()):
        if where.numel():
            delta = body[name].float().flatten()[where] - base[name].float().flatten()[where]
            payload[name + INDICES] = where.to(torch.int32)
            payload[name + VALUES] = delta.to(DTYPES[dtype])
    return payload


def encode_sparse(body: Tensors, base: Tensors, density: float, dtype: str,
                  scores: Tensors | None = None) -> Tensors:
    """`scores` (same names and shapes as the float tensors) rank the entries; default |delta|."""
    names = sorted(k for k, v in body.items() if v.is_floating_point())
    if scores is not None and (missing := [k for k in names if k not in scores]):
        raise ColdFusionError(f"sparse by Fisher score: no Fisher for tensors {missing[:3]}")
    ranking = {k: scores[k] if scores is not None else (body[k].float() - base[k].float()).abs() for k in names}
    return sparse_payload(body, base, top_share(ranking, density), dtype)


def decode_sparse(payload: Tensors, base: Tensors) -> Tensors:
    names = {k.removesuffix(INDICES) for k in payload if k.endswith(INDICES)}
    expected = {k + suffix for k in names for suffix in (INDICES, VALUES)}
    if set(payload) != expected:
        raise ColdFusionError(f"sparse payload has unpaired or unknown tensors {sorted(set(payload) ^ expected)[:3]}")
    if unknown := sorted(n for n in names if n not in base or not base[n].is_floating_point()):
        raise ColdFusionError(f"sparse entries for tensors the base has no float tensor of: {unknown[:3]}")
    out = dict(base)
    for name in names:
        indices, values = payload[name + INDICES], payload[name + VALUES]
        numel = base[name].numel()
        if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or values.shape != indices.shape \
                or not values.is_floating_point():
            raise ColdFusionError(f"sparse '{name}': indices must be 1-d integers with one float value each")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ColdFusionError(f"sparse '{name}': indices outside 0..{numel - 1}")
        if torch.unique(indices).numel() != indices.numel():
            raise ColdFusionError(f"sparse '{name}': an index is repeated")
        flat = base[name].float().flatten().clone()
        flat[indices.long()] += values.float()
        out[name] = flat.view_as(base[name]).to(base[name].dtype)
    return out
