"""`lora`: the contributor trains LoRA adapters (peft) instead of the whole body, and sends
only their factors A (r x in) and B (out x r) per adapted weight W.

The repository never averages A and B: it folds each pair into the body first,
W + (alpha / r) B A, and fuses folded bodies, so what it fuses is the products B A
(averaging the factors separately would average the wrong thing: mean(B) mean(A) is not
mean(B A)).
"""

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from coldfusion.encodings.delta import DTYPES
from coldfusion.encodings.settings import LoraSettings
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors

A, B = ".lora_A", ".lora_B"
ADAPTER = "default"


def attach_lora(body: torch.nn.Module, s: LoraSettings) -> torch.nn.Module:
    """The body with adapters on `target_modules`; only the adapters are trainable."""
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=s.target_modules, lora_dropout=0.0, bias="none")
    try:
        return get_peft_model(body, config)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ColdFusionError(f"contribution.lora.target_modules {s.target_modules} do not fit this body: {exc}") \
            from None


def lora_factors(peft_body: torch.nn.Module, dtype: str) -> Tensors:
    """{W name + '.lora_A': A, W name + '.lora_B': B} for every adapted weight W."""
    inner = peft_body.get_base_model()
    payload = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            payload[f"{name}.weight{A}"] = module.lora_A[ADAPTER].weight.detach().to("cpu", DTYPES[dtype]).clone()
            payload[f"{name}.weight{B}"] = module.lora_B[ADAPTER].weight.detach().to("cpu", DTYPES[dtype]).clone()
    return payload


def fold_lora(payload: Tensors, base: Tensors, alpha: float, r: int) -> Tensors:
    """base with W + (alpha / r) B A for every pair of factors."""
    weights = {k.removesuffix(A) for k in payload if k.endswith(A)}
    expected = {w + suffix for w in weights for suffix in (A, B)}
    if set(payload) != expected:
        raise ColdFusionError(f"LoRA payload has unpaired or unknown tensors {sorted(set(payload) ^ expected)[:3]}")
    out = dict(base)
    for w in sorted(weights):
        if w not in base or base[w].dim() != 2:
            raise ColdFusionError(f"LoRA factors for '{w}', which is not a weight matrix of the base")
        a, b = payload[w + A].float(), payload[w + B].float()
        (rows, cols), rank = base[w].shape, a.shape[0]
        if a.shape != (rank, cols) or b.shape != (rows, rank) or rank != r:
            raise ColdFusionError(f"LoRA factors of '{w}' are {list(b.shape)} x {list(a.shape)}; the weight is "
                                  f"{[rows, cols]} and the rank {r}")
        out[w] = (base[w].float() + (alpha / r) * (b @ a)).to(base[w].dtype)
    return out


def load_lora_factors(peft_body: torch.nn.Module, payload: Tensors) -> None:
    """Set the adapters of `peft_body` to the factors `lora_factors` gave (to continue training
    an adapter: intertraining in adapter settings, then the target)."""
    inner = peft_body.get_base_model()
    adapted = {name: module for name, module in inner.named_modules()
               if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}
    wanted = {k.removesuffix(A).removesuffix(".weight") for k in payload if k.endswith(A)}
    if wanted != set(adapted):
        raise ColdFusionError(f"LoRA factors for {sorted(wanted ^ set(adapted))[:3]} do not match this body's "
                              "adapters (other target_modules?)")
    with torch.no_grad():
        for name, module in adapted.items():
            module.lora_A[ADAPTER].weight.copy_(payload[f"{name}.weight{A}"])
            module.lora_B[ADAPTER].weight.copy_(payload[f"{name}.weight{B}"])
