import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coldfusion.models.encoder import Classifier, Encoder
from coldfusion.tasks import load_task
from coldfusion.training import FinetuneSettings, ProbeSettings, classification_metrics, encode, linear_probe
from coldfusion.training.batching import collate, length_bucketed_batches
from coldfusion.training.evaluate import evaluate
from coldfusion.training.finetune import finetune
from coldfusion.training.probe import probe_features


def test_metrics_known_answer():
    # classes 0,1,2: per-class F1 = 2/3, 2/3, 0 (class 2 only predicted, never true) -> macro 4/9
    m = classification_metrics([0, 1, 1, 0, 2], [0, 1, 0, 1, 1])
    assert m["accuracy"] == pytest.approx(2 / 5)
    f1_0 = 2 * 1 / (2 * 1 + 1 + 1)  # tp=1 (i0), fp=1 (i3), fn=1 (i2)
    f1_1 = 2 * 1 / (2 * 1 + 1 + 2)  # tp=1 (i1), fp=1 (i2), fn=2 (i3, i4)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1 + 0.0) / 3)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=300), batch=st.integers(1, 40),
       seed=st.integers(0, 1000), train=st.booleans())
def test_bucketed_batches_cover_every_example_once(lengths, batch, seed, train):
    lengths = np.array(lengths)
    rng = np.random.RandomState(seed) if train else None
    batches = length_bucketed_batches(lengths, batch, rng, bucket_batches=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch for b in batches)
    if not train:  # inference batches are globally sorted by length
        assert np.all(np.diff(lengths[flat]) >= 0)


def test_bucketing_reduces_padding():
    rng = np.random.RandomState(0)
    lengths = rng.randint(5, 128, size=2000)
    bucketed = length_bucketed_batches(lengths, 32, np.random.RandomState(1))
    pad_bucketed = sum(len(b) * lengths[b].max() for b in bucketed)
    pad_to_max = len(lengths) * 128
    assert pad_bucketed < 0.6 * pad_to_max


def test_collate_pads_to_batch_max(tiny_model_dir, toy_task_files):
    enc = Encoder.load(str(tiny_model_dir))
    task = load_task({"name": "s", "path": toy_task_files["sentiment"]})
    data = encode(task.train, enc.tokenizer, max_length=64)
    idx = np.array([0, 1, 2])
    batch = collate(data, idx)
    width = max(len(data.input_ids[i]) for i in idx)
    assert batch["input_ids"].shape == (3, width)
    assert batch["attention_mask"].sum().item() == sum(len(data.input_ids[i]) for i in idx)


def test_finetune_learns_a_toy_task(tiny_model_dir, toy_task_files):
    torch.manual_seed(0)
    enc = Encoder.load(str(tiny_model_dir))
    task = load_task({"name": "s", "path": toy_task_files["sentiment"]})
    tr, va, te = (encode(getattr(task, s), enc.tokenizer, 32) for s in ("train", "validation", "test"))
    model = Classifier(enc.new_body(), task.num_labels)
    before = evaluate(model, te)["accuracy"]
    result = finetune(model, tr, va, FinetuneSettings(epochs=4, lr=3e-3, head_lr=1e-2, batch_size=16), seed=0)
    after = evaluate(model, te)["accuracy"]
    assert after >= 0.9 > before + 0.2
    assert result.examples_seen == 4 * len(tr) and result.steps == 4 * -(-len(tr) // 16)
    assert result.best_validation_accuracy == pytest.approx(evaluate(model, va)["accuracy"])


def test_finetune_is_deterministic(tiny_model_dir, toy_task_files):
    enc = Encoder.load(str(tiny_model_dir))
    task = load_task({"name": "s", "path": toy_task_files["sentiment"]})
    tr = encode(task.train.head(64), enc.tokenizer, 32)
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model = Classifier(enc.new_body(), task.num_labels)
        finetune(model, tr, None, FinetuneSettings(epochs=1, batch_size=16), seed=7)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_early_stopping_restores_the_best_checkpoint(tiny_model_dir, toy_task_files):
    enc = Encoder.load(str(tiny_model_dir))
    task = load_task({"name": "s", "path": toy_task_files["sentiment"]})
    tr, va = encode(task.train, enc.tokenizer, 32), encode(task.validation, enc.tokenizer, 32)
    model = Classifier(enc.new_body(), task.num_labels)
    # A learning rate this large diverges after a good start; patience 1 must stop it.
    s = FinetuneSettings(epochs=30, lr=5e-3, head_lr=5e-2, batch_size=16, eval_every=5, patience=1, warmup_ratio=0)
    result = finetune(model, tr, va, s, seed=0)
    best = max(h["validation_accuracy"] for h in result.history)
    assert result.best_validation_accuracy == best
    assert evaluate(model, va)["accuracy"] == pytest.approx(best)
    assert result.stopped_early and result.steps < 30 * len(tr) // 16


def test_probe_separable_features_beats_random():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centers = torch.randn(3, 16, generator=g) * 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    noise = torch.randn(300, 16, generator=g)
    split = lambda f: ((f[:200], y[:200]), (f[200:250], y[200:250]), (f[250:], y[250:]))  # noqa: E731
    good = probe_features(*split(x), num_labels=3, settings=ProbeSettings())
    bad = probe_features(*split(noise), num_labels=3, settings=ProbeSettings())
    assert good.test["accuracy"] > 0.95
    assert bad.test["accuracy"] < 0.6


def test_linear_probe_freezes_the_body(tiny_model_dir, toy_task_files):
    enc = Encoder.load(str(tiny_model_dir))
    task = load_task({"name": "t", "path": toy_task_files["topic"]})
    splits = [encode(getattr(task, s), enc.tokenizer, 32) for s in ("train", "validation", "test")]
    model = Classifier(enc.new_body(), task.num_labels)
    before = {k: v.clone() for k, v in model.body.state_dict().items()}
    result = linear_probe(model, *splits, num_labels=task.num_labels)
    assert all(torch.equal(before[k], v) for k, v in model.body.state_dict().items())
    assert 0.0 <= result.test["accuracy"] <= 1.0 and result.l2 in ProbeSettings().l2_grid
