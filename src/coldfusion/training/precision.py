"""How a model trains and infers in its precision (chosen by runtime.resolve_precision).

- fp32: the reference path, torch's own kernels throughout.
- bf16: the model computes in bf16 while the optimizer updates fp32 master copies of the
  weights, copied back after each step. An AdamW step moves a weight by about 1e-5 of
  itself, far below bf16's resolution (2^-8): on bf16 weights most updates would vanish.
  Fast where the hardware multiplies bf16 natively (CUDA since Ampere; CPUs with
  AVX512-BF16 or AMX, about 2.3x the fp32 rate on this project's 2-core machine).
- fp16: CUDA or MPS only, by autocast with loss scaling (its narrow range needs the scaler).
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


@contextmanager
def cast_to(model: nn.Module, dtype: torch.dtype) -> Iterator[dict[nn.Parameter, torch.Tensor]]:
    """Run `model` in `dtype` inside the block; afterwards it holds its original tensors again
    (restored, not cast back, so nothing is lost). Yields each parameter's original tensor,
    which a master-weights optimizer may update in place."""
    originals: dict[nn.Parameter, torch.Tensor] = {}
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            originals[param] = param.data
            param.data = param.data.to(dtype)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                buffers.append((module, name, buffer))
                setattr(module, name, buffer.to(dtype))
    try:
        yield originals
    finally:
        for param, original in originals.items():
            param.data = original
            param.grad = None
        for module, name, buffer in buffers:
            setattr(module, name, buffer)


class FullPrecision:
    """The precision-specific part of a training loop; this one: fp32 as it is."""

    def optimized(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The tensors the optimizer updates for these parameters."""
        return params

    def autocast(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(_params_of(optimizer), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """fp32 copies of the trainable parameters, by name (for `load_state_dict(strict=False)`)."""
        return {name: self.optimized([p])[0].detach().clone()
                for name, p in model.named_parameters() if p.requires_grad}


class MasterWeights(FullPrecision):
    """bf16 training with fp32 master weights (inside `cast_to(model, torch.bfloat16)`): the
    optimizer updates the fp32 originals; each step copies the bf16 gradients to them,
    clips there, steps, and copies the result back into the model."""

    def __init__(self, originals: dict[nn.Parameter, torch.Tensor]):
        self.pairs = [(p, original) for p, original in originals.items() if p.requires_grad]
        self._master_of = dict(self.pairs)

    def optimized(self, params):
        return [self._master_of.get(p, p) for p in params]

    def step(self, optimizer, max_grad_norm):
        for param, master in self.pairs:
            if param.grad is None:
                master.grad = None
            elif master.grad is None:  # allocated once: a fresh fp32 buffer per step costs page faults
                master.grad = param.grad.to(master.dtype)
            else:
                master.grad.copy_(param.grad)
            param.grad = None
        torch.nn.utils.clip_grad_norm_(_params_of(optimizer), max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            for param, master in self.pairs:
                param.copy_(master)


class LossScaling(FullPrecision):
    """fp16 by autocast, the loss scaled so that small gradients do not underflow."""

    def __init__(self, device: torch.device):
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def step(self, optimizer, max_grad_norm):
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(_params_of(optimizer), max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextmanager
def training_precision(model: nn.Module, dtype: torch.dtype) -> Iterator[FullPrecision]:
    """Train `model` (a module holding everything that trains) in `dtype` inside the block.

    On a CPU, reduced precision also draws dropout masks the cheap way (fast_dropout.py):
    fp32 stays the reference path, torch's own kernels throughout."""
    device = next(model.parameters()).device
    if dtype == torch.bfloat16:
        from coldfusion.training.fast_dropout import fast_dropout

        with cast_to(model, dtype) as originals, (fast_dropout(model) if device.type == "cpu" else nullcontext()):
            yield MasterWeights(originals)
    elif dtype == torch.float16:
        yield LossScaling(device)
    else:
        yield FullPrecision()
