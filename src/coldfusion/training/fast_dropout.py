"""Dropout with cheaper random numbers, for reduced-precision training on a CPU.

torch's CPU dropout draws one random number per element from a serial generator; in a
bf16 MiniLM training step that is about a sixth of the time. Here one 64-bit draw gives
four 16-bit lanes, and a lane drops its element when it falls below p * 2^16: the drop
probability is p to within 2^-16, and the draws come from torch's seeded generator, so
runs stay reproducible. Attention-probability dropout happens inside the attention
function, so `fast_dropout` also registers one with transformers' AttentionInterface:
torch's SDPA when nothing is dropped, the same softmax-then-dropout maths otherwise.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "coldfusion_fast_dropout"


def keep_mask(shape: torch.Size, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Bernoulli(1 - p) booleans of `shape`, four per 64-bit random draw."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n]
    return (lanes >= round(p * 65536) - 32768).view(shape)


def apply_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    return x * keep_mask(x.shape, p, x.device).to(x.dtype).mul_(1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Bidirectional attention; (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    if dropout == 0:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # sdpa_mask's booleans: True where a token may attend
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(apply_dropout(weights, dropout), value)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model`'s dropout draws its masks the cheap way; restored after."""
    swapped = []
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                swapped.append((module, name, child))
                setattr(module, name, FastDropout(child.p).train(child.training))
    attention_before = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module._can_set_attn_implementation():
            attention_before.append((module, module.config._attn_implementation))
    for module, _ in attention_before:
        module.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)
        for module, before in attention_before:
            module.set_attn_implementation(before)
