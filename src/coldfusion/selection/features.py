"""Frozen features: a body's pooled sentence embeddings of a split, extracted once and cached."""

import time
from dataclasses import dataclass

import torch

from coldfusion.infra.runtime import Compute, precision_name
from coldfusion.models.encoder import Classifier, Encoder
from coldfusion.repository import Repository
from coldfusion.selection.bodies import Body
from coldfusion.selection.cache import digest, precision_part, split_fingerprint
from coldfusion.tasks import Split
from coldfusion.training import encode, extract_features


@dataclass(frozen=True)
class Features:
    values: torch.Tensor  # (N, hidden), float32
    labels: torch.Tensor  # (N,)
    seconds: float  # what extracting them cost (when first computed)


def frozen_features(store: Repository, body: Body, encoder: Encoder, split: Split, max_length: int,
                    pooling: str, batch_size: int = 64, compute: Compute | None = None) -> Features:
    """`compute`: device and precision (default: CPU, fp32; other precisions are cached apart)."""
    precision = "fp32" if compute is None else precision_name(compute.dtype)
    key = digest("features", body=body.sha256, tokenizer=encoder.source, split=split_fingerprint(split),
                 max_length=max_length, pooling=pooling, **precision_part(precision))
    hit = store.recall(key)
    if hit is not None:
        tensors = store.load(hit.sha256)
        return Features(tensors["features"], tensors["labels"], hit.value["seconds"])
    start = time.perf_counter()
    model = Classifier(encoder.new_body(body.tensors), num_labels=2, pooling=pooling)  # the head is never used
    if compute is not None:
        model.place(compute.device, compute.dtype)
    values = extract_features(model, encode(split, encoder.tokenizer, max_length), batch_size)
    seconds = time.perf_counter() - start
    labels = torch.tensor(split.labels, dtype=torch.long)
    store.remember(key, "features", {"body": body.name, "examples": len(split), "seconds": seconds},
                   {"features": values, "labels": labels})
    return Features(values, labels, seconds)
