"""Tokenize once, then batch by length with per-batch (dynamic) padding.

On a CPU, padding is pure waste: sorting examples of similar length into the same batch
and padding only to the longest in that batch is most of our speed-up over pad-to-max.
"""

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from coldfusion.tasks.task import Split


@dataclass(frozen=True)
class Encoded:
    """Token ids of one split (unpadded, truncated) and its labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))

    def take(self, indices) -> "Encoded":
        idx = [int(i) for i in indices]
        return Encoded(
            input_ids=[self.input_ids[i] for i in idx],
            token_type_ids=None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx],
            labels=self.labels[idx],
            pad_id=self.pad_id,
        )


def encode(split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    out = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length, padding=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(
        input_ids=out["input_ids"],
        token_type_ids=out.get("token_type_ids") if split.pairs is not None else None,
        labels=torch.tensor(split.labels, dtype=torch.long),
        pad_id=pad_id,
    )


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.RandomState | None, bucket_batches: int = 50
) -> list[np.ndarray]:
    """Index batches of similar length.

    Training (rng given): shuffle, sort within windows of `bucket_batches` batches, then
    shuffle the batch order, so batches stay random but padding stays small.
    Inference (rng None): one global sort by length.
    """
    n = len(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    order = rng.permutation(n)
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, n, window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are: batches go there (training and inference follow the model)."""
    return next(model.parameters()).device


def collate(data: Encoded, indices: np.ndarray, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest example (and move it to `device`)."""
    rows = [data.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.tensor(r)
        attention_mask[j, : len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if data.token_type_ids is not None:
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(indices):
            t = data.token_type_ids[i]
            types[j, : len(t)] = torch.tensor(t)
        batch["token_type_ids"] = types
    if device is not None and torch.device(device).type != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch
