"""Poisoned contributors, simulated, to measure how a fusion method holds up against them.

With `attack:` in a run config, the named contributors replace the update they computed
(delta = body - base) before sending it:

- `scale`: base + factor * delta (a boosted update, as in model-replacement attacks);
- `sign_flip`: base - factor * delta (pushes the base away from what the task needs);
- `random`: base + noise, Gaussian per tensor with factor times that tensor's delta norm.

The loop applies it to what the engine returned, so local and Flower runs are attacked
alike. It is a research instrument; a real deployment never sets it.
"""

from dataclasses import replace

import torch

from coldfusion.collab.config import AttackSettings
from coldfusion.collab.round import RoundResult
from coldfusion.infra.runtime import derive_seed
from coldfusion.io.checkpoint import Tensors


def poisoned_update(body: Tensors, base: Tensors, kind: str, factor: float, seed: int) -> Tensors:
    """The body a poisoned contributor sends instead of `body` (integer buffers untouched)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(body):
        value = body[name]
        if not value.is_floating_point():
            out[name] = value
            continue
        delta = value.float() - base[name].float()
        if kind == "scale":
            delta = factor * delta
        elif kind == "sign_flip":
            delta = -factor * delta
        else:
            noise = torch.randn(delta.shape, generator=generator)
            delta = noise * (factor * delta.norm() / noise.norm().clamp(min=1e-30))
        out[name] = (base[name].float() + delta).to(value.dtype)
    return out


def poison_round(round_: RoundResult, base: Tensors, attack: AttackSettings, seed: int, iteration: int) -> RoundResult:
    """The round with the attackers' contributions replaced."""
    results = [
        replace(r, body=poisoned_update(r.body, base, attack.kind, attack.factor,
                                        derive_seed(seed, "attack", r.contributor, iteration)))
        if r.contributor in attack.contributors else r
        for r in round_.results
    ]
    return replace(round_, results=results)
