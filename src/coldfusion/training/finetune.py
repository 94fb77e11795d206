"""Full finetuning of body + head: AdamW, warm-up + linear decay, early stopping.

Training follows the model: its device, and its `compute_dtype` (training/precision.py).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from coldfusion.infra.faults import failpoint
from coldfusion.models.encoder import Classifier
from coldfusion.training.batching import Encoded, collate, device_of, length_bucketed_batches
from coldfusion.training.evaluate import evaluate
from coldfusion.training.precision import training_precision
from coldfusion.training.settings import FinetuneSettings


@dataclass
class FinetuneResult:
    steps: int
    examples_seen: int
    seconds: float
    best_validation_accuracy: float | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.examples_seen / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        """What a finetune reports with the body it made (a contribution's or an intertraining's metrics)."""
        return {"steps": self.steps, "seconds": round(self.seconds, 2),
                "validation_accuracy": self.best_validation_accuracy, "stopped_early": self.stopped_early}


def make_optimizer(body: torch.nn.Module, heads: list[torch.nn.Module], s: FinetuneSettings,
                   optimized=lambda params: params) -> torch.optim.AdamW:
    """AdamW: the body at `lr` (no decay on biases and LayerNorm), the heads at `head_lr`.

    `optimized` maps parameters to the tensors the optimizer updates (their fp32 masters
    in bf16 training). One fused kernel per step where torch has it for the device."""
    decay, no_decay = [], []
    for p in body.parameters():
        if p.requires_grad:  # frozen parts stay out (CA-MTL freezes the bottom half)
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": optimized(decay), "lr": s.lr, "weight_decay": s.weight_decay},
        {"params": optimized(no_decay), "lr": s.lr, "weight_decay": 0.0},
        {"params": optimized([p for h in heads for p in h.parameters()]), "lr": s.head_lr,
         "weight_decay": s.weight_decay},
    ]
    return torch.optim.AdamW(groups, fused=True)


def finetune(
    model: Classifier,
    train: Encoded,
    validation: Encoded | None,
    settings: FinetuneSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Train `model` in place; with a validation split, restore the best checkpoint seen."""
    s = settings
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * s.epochs))
    eval_every = s.eval_every or steps_per_epoch
    loss_fn = torch.nn.CrossEntropyLoss()
    device = device_of(model)

    best_acc, best_state, bad_checks, stopped = None, None, 0, False
    history, step, seen, start = [], 0, 0, time.perf_counter()
    model.train()
    with training_precision(model, model.compute_dtype) as precision:
        optimizer = make_optimizer(model.body, [model.head], s, precision.optimized)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(s.warmup_ratio * total_steps), total_steps)
        while step < total_steps and not stopped:
            for idx in length_bucketed_batches(train.lengths, s.batch_size, rng):
                with precision.autocast():
                    logits = model(**collate(train, idx, device))
                loss = loss_fn(logits.float(), train.labels[idx].to(device))
                precision.backward(loss)
                precision.step(optimizer, s.max_grad_norm)
                scheduler.step()
                step += 1
                seen += len(idx)
                failpoint("training.step")
                if on_step:
                    on_step(len(idx))
                if validation is not None and (step % eval_every == 0 or step == total_steps):
                    acc = evaluate(model, validation)["accuracy"]
                    history.append({"step": step, "loss": loss.item(), "validation_accuracy": acc})
                    if best_acc is None or acc > best_acc:
                        best_acc, best_state, bad_checks = acc, precision.snapshot(model), 0
                    else:
                        bad_checks += 1
                        stopped = bad_checks >= s.patience
                if step >= total_steps or stopped:
                    break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return FinetuneResult(step, seen, time.perf_counter() - start, best_acc, stopped, history)
