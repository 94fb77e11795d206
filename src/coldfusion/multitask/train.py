"""Multitask training: one shared body, one head per task, each step's batch chosen by a sampler.

Task samplers (proportional, uniform, temperature, mometas) pick the task of the next
batch; `uncertainty` (CA-MTL) instead scores a candidate batch from every task and trains
on the most uncertain examples, whatever their task. `mometas` learns from each task's
loss on a held-out sample of its validation split, measured every `every` steps. Training
follows the heads' device and `compute_dtype`, as finetuning does.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from coldfusion.models.encoder import Classifier
from coldfusion.multitask.config import MultitaskSettings
from coldfusion.multitask.samplers import make_sampler, most_uncertain
from coldfusion.training.batching import Encoded, collate, device_of, length_bucketed_batches
from coldfusion.training.finetune import make_optimizer
from coldfusion.training.precision import training_precision


@dataclass
class MultitaskResult:
    steps: int
    examples_seen: int
    seconds: float
    examples_per_task: dict[str, int]
    history: list[dict] = field(default_factory=list)


def _batches(data: Encoded, batch_size: int, rng: np.random.RandomState) -> Iterator[np.ndarray]:
    """Length-bucketed batches of one task, epoch after epoch, forever."""
    while True:
        yield from length_bucketed_batches(data.lengths, batch_size, rng)


def _loss(model: Classifier, data: Encoded, idx: np.ndarray) -> torch.Tensor:
    device = device_of(model)
    logits = model(**collate(data, idx, device)).float()
    return torch.nn.functional.cross_entropy(logits, data.labels[idx].to(device), reduction="sum")


@torch.no_grad()
def _heldout_losses(models: dict[str, Classifier], heldout: dict[str, Encoded]) -> list[float]:
    """Each task's mean loss on its held-out sample, in eval mode (no dropout)."""
    for m in models.values():
        m.eval()
    return [(_loss(models[t], d, np.arange(len(d))) / len(d)).item() for t, d in heldout.items()]


def train_multitask(
    body: torch.nn.Module,
    heads: dict[str, Classifier],
    train: dict[str, Encoded],
    validation: dict[str, Encoded],
    settings: MultitaskSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    new_modules: list[torch.nn.Module] | None = None,
) -> MultitaskResult:
    """Train `body` (shared by the `heads` classifiers, one per task) in place; `new_modules`
    (CA-MTL's conditioning) are trained from scratch at the heads' learning rate."""
    s, opt = settings, settings.optimizer
    names = list(train)
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    draw_rng = np.random.default_rng(seed)
    streams = {t: _batches(train[t], opt.batch_size if s.sampler != "uncertainty" else
                           (s.candidates_per_task or opt.batch_size), rng) for t in names}
    sampler = None if s.sampler == "uncertainty" else make_sampler(s.sampler, [len(train[t]) for t in names],
                                                                   **s.sampler_params)
    heldout = {t: validation[t].take(range(min(s.heldout_per_task, len(validation[t])))) for t in names}
    model = torch.nn.ModuleList(heads.values())  # every trained parameter, the shared body once
    counts, history, seen, start = dict.fromkeys(names, 0), [], 0, time.perf_counter()
    with training_precision(model, next(iter(heads.values())).compute_dtype) as precision:
        optimizer = make_optimizer(body, [m.head for m in heads.values()] + list(new_modules or []), opt,
                                   precision.optimized)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(opt.warmup_ratio * s.steps), s.steps)
        if sampler is not None and sampler.every:
            sampler.observe(_heldout_losses(heads, heldout))
        for step in range(1, s.steps + 1):
            if sampler is None:  # uncertainty: the most uncertain examples among every task's candidates
                candidates = {t: next(streams[t]) for t in names}
                for m in heads.values():
                    m.eval()
                with torch.no_grad():
                    logits = [heads[t](**collate(train[t], candidates[t], device_of(body))).float().cpu().numpy()
                              for t in names]
                chosen = most_uncertain(logits, opt.batch_size)
                picked = {t: candidates[t][[r for ti, r in chosen if names[ti] == t]] for t in names}
                picked = {t: idx for t, idx in picked.items() if len(idx)}
            else:
                task = names[sampler.draw(draw_rng)]
                picked = {task: next(streams[task])}
            for m in heads.values():
                m.train()
            total = sum(len(idx) for idx in picked.values())
            with precision.autocast():
                loss = sum(_loss(heads[t], train[t], idx) for t, idx in picked.items()) / total
            precision.backward(loss)
            precision.step(optimizer, opt.max_grad_norm)
            scheduler.step()
            for t, idx in picked.items():
                counts[t] += len(idx)
            seen += total
            row = {"step": step, "loss": loss.item(), "examples": {t: len(idx) for t, idx in picked.items()}}
            if sampler is not None and sampler.every and step % sampler.every == 0:
                losses = _heldout_losses(heads, heldout)
                row["reward"] = sampler.observe(losses)
                row["heldout_losses"] = dict(zip(names, np.round(losses, 5).tolist(), strict=True))
                row["probabilities"] = dict(zip(names, np.round(sampler.probabilities(), 4).tolist(), strict=True))
            history.append(row)
            if on_step:
                on_step(total)
    for m in heads.values():
        m.eval()
    return MultitaskResult(s.steps, seen, time.perf_counter() - start, counts, history)
