"""The expensive truth: intertraining on a source, and finetuning a body on the target.

Both are cached in the repository under a digest of their inputs and settings (one
result per seed), so they are paid for once and an interrupted harness resumes. In
adapter settings (`intertraining: lora`) a LoRA adapter is trained on the source and the
same adapter continues on the target, as in Poth et al. (2021); the body never changes.
"""

import time
from dataclasses import replace

import numpy as np
import torch

from coldfusion.encodings.lora import attach_lora, fold_lora, load_lora_factors, lora_factors
from coldfusion.evaluation.config import ProtocolSettings
from coldfusion.evaluation.protocols import run_protocol
from coldfusion.infra.runtime import Compute, derive_seed, precision_name
from coldfusion.models.encoder import Classifier, Encoder, body_tensors
from coldfusion.repository import Repository
from coldfusion.selection.bodies import Body, body_of
from coldfusion.selection.cache import digest, precision_part, split_fingerprint
from coldfusion.selection.settings import SelectionSettings, compute_of
from coldfusion.tasks import Task
from coldfusion.training import encode
from coldfusion.training.finetune import finetune


def intertrain(store: Repository, encoder: Encoder, base: Body, source: Task, s: SelectionSettings,
               seed: int = 0) -> tuple[Body, float]:
    """The base finetuned on `source` (its first `source_examples`), and what that cost in seconds."""
    compute = compute_of(s)
    key = digest("intertrained", base=base.sha256, source=split_fingerprint(source.train), examples=s.source_examples,
                 finetune=s.source_finetune.model_dump(), max_length=s.max_length, pooling=s.pooling, seed=seed,
                 **precision_part(precision_name(compute.dtype)), **_adapter_part(s))
    hit = store.recall(key)
    if hit is None:
        start = time.perf_counter()
        body, metrics = _finetune_on_source(encoder, base, source, s, seed, compute)
        hit = store.remember(key, "intertrained", {"base": base.name, "source": source.name,
                                                   "seconds": time.perf_counter() - start, **metrics}, body)
    name, stored = f"{base.name}+{source.name}", store.load(hit.sha256)
    if s.intertraining == "lora":  # the stored tensors are the adapter's factors
        folded = body_of(name, base.source, fold_lora(stored, base.tensors, s.lora.alpha, s.lora.r))
        return replace(folded, adapter=stored, adapter_base=base.tensors), hit.value["seconds"]
    return Body(name, base.source, hit.sha256, stored), hit.value["seconds"]


def _adapter_part(s: SelectionSettings) -> dict:
    """What adapter settings add to a cache key (nothing for full intertraining: its keys stay)."""
    return {"adapter": s.lora.model_dump()} if s.intertraining == "lora" else {}


def finetune_accuracy(store: Repository, encoder: Encoder, body: Body, target: Task, seed: int,
                      s: SelectionSettings) -> tuple[float, float]:
    """Test accuracy of `body` finetuned on the target's first `target_examples` (fixed
    epochs, no early stopping), and the seconds it cost. The seed fixes the head and the
    batch order: the same for every body, so bodies are compared pairwise."""
    test = target.test.head(s.test_examples)
    train = target.train.head(s.target_examples)
    compute = compute_of(s)
    key = digest("finetune_score", body=body.sha256, tokenizer=encoder.source, train=split_fingerprint(train),
                 test=split_fingerprint(test), finetune=s.finetune.model_dump(), max_length=s.max_length,
                 pooling=s.pooling, seed=seed, task=target.name, **precision_part(precision_name(compute.dtype)),
                 **_adapter_part(s))
    hit = store.recall(key)
    if hit is None:
        start = time.perf_counter()
        splits = {"train": encode(train, encoder.tokenizer, s.max_length), "validation": None,
                  "test": encode(test, encoder.tokenizer, s.max_length)}
        tensors, settings, prepare = body.tensors, s.finetune, None
        if s.intertraining == "lora":  # the source's adapter continues (a fresh one on a body without)
            tensors = body.adapter_base if body.adapter is not None else body.tensors
            settings = s.finetune.model_copy(update={"lr": s.lora.lr})
            prepare = lambda model: _attach_adapter(model, s, body.adapter)  # noqa: E731
        score = run_protocol("finetune", lambda: encoder.new_body(tensors), target, splits, seed,
                             ProtocolSettings(finetune=settings), encoder.tokenizer, s.max_length, s.pooling,
                             compute, prepare)
        hit = store.remember(key, "finetune_score", {"body": body.name, "target": target.name, "seed": seed,
                                                     "seconds": time.perf_counter() - start, **score.metrics})
    return hit.value["accuracy"], hit.value["seconds"]


def _finetune_on_source(encoder: Encoder, base: Body, source: Task, s: SelectionSettings, seed: int,
                        compute: Compute) -> tuple[dict, dict]:
    """The base with a fresh head, finetuned on a seeded sample of `source_examples` training
    examples, early-stopped on `validation_examples`: (its body, the finetune's numbers).
    Seeds derive from the source's name, as a ColD Fusion contributor's first round does."""
    order = np.random.RandomState(derive_seed(seed, "data", source.name)).permutation(len(source.train))
    train = encode(source.train, encoder.tokenizer, s.max_length).take(order[:s.source_examples])
    validation = encode(source.validation.head(s.validation_examples), encoder.tokenizer, s.max_length)
    adapters = s.intertraining == "lora"
    with torch.random.fork_rng(devices=[]):  # the head (and the adapter's A) depend on the names only
        torch.manual_seed(derive_seed(seed, "head", source.name, 0))
        model = Classifier(encoder.new_body(base.tensors), source.num_labels, pooling=s.pooling)
        if adapters:
            _attach_adapter(model, s)
    model.place(compute.device, compute.dtype)
    settings = s.source_finetune.model_copy(update={"lr": s.lora.lr}) if adapters else s.source_finetune
    result = finetune(model, train, validation, settings, seed=derive_seed(seed, "finetune", source.name, 0))
    return (lora_factors(model.body, "float32") if adapters else body_tensors(model.body)), result.summary()


def _attach_adapter(model: Classifier, s: SelectionSettings, factors: dict | None = None) -> None:
    """A LoRA adapter on the model's body (only it and the head train), set to `factors` if given."""
    model.body = attach_lora(model.body, s.lora)
    if factors is not None:
        load_lora_factors(model.body, factors)

