"""Precision: how it is chosen, how bf16 trains (fp32 master weights), the cheap dropout of
the CPU fast path, and how far bf16 results may stray from fp32 ones."""

from pathlib import Path

import pytest
import torch
from torch import nn

from coldfusion.infra import runtime
from coldfusion.infra.runtime import resolve_compute, resolve_precision
from coldfusion.models.encoder import Classifier, Encoder
from coldfusion.tasks import load_task
from coldfusion.training import FinetuneSettings, encode
from coldfusion.training.evaluate import evaluate
from coldfusion.training.fast_dropout import FastDropout, apply_dropout, fast_dropout, keep_mask
from coldfusion.training.finetune import finetune
from coldfusion.training.precision import MasterWeights, cast_to
from coldfusion.training.probe import extract_features

CPU = torch.device("cpu")
NATIVE_BF16 = bool(runtime.cpu_bf16_units())
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")


def test_auto_takes_bf16_exactly_where_the_cpu_multiplies_it_natively():
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if NATIVE_BF16 else torch.float32)
    assert resolve_precision("fp32", CPU) == torch.float32
    assert resolve_precision(" FP32 ", CPU) == torch.float32
    compute = resolve_compute("cpu", "fp32", "auto")
    assert compute.threads == runtime.available_cores() and compute.dtype == torch.float32


def test_precisions_the_hardware_cannot_run_are_errors_that_say_what_was_found(monkeypatch):
    with pytest.raises(ValueError, match="needs a CUDA or MPS device, not the CPU; use"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", CPU)
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: [])  # a CPU without bf16 units
    with pytest.raises(ValueError, match="neither AVX512-BF16 nor AMX.*use precision: fp32"):
        resolve_precision("bf16", CPU)
    assert resolve_precision("auto", CPU) == torch.float32


def test_cast_to_runs_the_model_in_the_dtype_and_gives_back_the_very_same_tensors():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_buffer("scale", torch.tensor([1 / 3]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with cast_to(model, torch.bfloat16) as originals:
        assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and model.scale.dtype == torch.bfloat16
        assert set(originals) == set(model.parameters())
        model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)  # bit for bit
    assert all(p.grad is None for p in model.parameters())


def test_master_weights_keep_updates_that_bf16_weights_would_lose():
    """100 SGD steps of 1e-4 on a weight of 1.0: 0.99 in fp32 masters; a bf16 weight cannot
    move by 1e-4 (its spacing near 1 is 2^-7), so an optimizer on it would stay at 1.0."""
    layer = nn.Linear(1, 1, bias=False)
    nn.init.ones_(layer.weight)
    bare = torch.ones(1, dtype=torch.bfloat16)
    with cast_to(layer, torch.bfloat16) as originals:
        precision = MasterWeights(originals)
        optimizer = torch.optim.SGD(precision.optimized([layer.weight]), lr=1e-4)
        for _ in range(100):
            layer(torch.ones(1, 1, dtype=torch.bfloat16)).sum().backward()  # d/dw = 1
            precision.step(optimizer, max_grad_norm=10.0)
            bare -= 1e-4
    assert bare.item() == 1.0
    assert layer.weight.dtype == torch.float32
    assert layer.weight.item() == pytest.approx(0.99, abs=1e-5)  # fp32 rounding over 100 steps


def test_fast_dropout_drops_at_the_asked_rate_keeps_the_expectation_and_repeats_with_the_seed():
    n = 1_000_000
    for p in (0.1, 0.5):
        drop_rate = 1 - keep_mask((n,), p).float().mean().item()
        assert abs(drop_rate - p) < 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations
    x = torch.ones(n)
    assert apply_dropout(x, 0.1).mean().item() == pytest.approx(1.0, abs=0.005)  # inverted scaling
    assert torch.equal(apply_dropout(x, 0.3, training=False), x) and torch.equal(apply_dropout(x, 0.0), x)
    assert torch.equal(apply_dropout(x, 1.0), torch.zeros(n))
    torch.manual_seed(7)
    first = FastDropout(0.2)(x)
    torch.manual_seed(7)
    assert torch.equal(first, FastDropout(0.2)(x))


def test_fast_dropout_is_swapped_in_and_out_and_changes_nothing_at_inference(tiny_model_dir):
    encoder = Encoder.load(str(tiny_model_dir))
    model = Classifier(encoder.new_body(), 3).eval()
    ids = torch.randint(5, encoder.config.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    reference = model(ids, mask)
    implementation = model.body.config._attn_implementation
    with fast_dropout(model):
        assert any(isinstance(m, FastDropout) for m in model.modules())
        assert model.body.config._attn_implementation != implementation
        assert torch.allclose(model(ids, mask), reference, atol=1e-6)  # no dropout in eval: the same maths
        model.train()
        torch.manual_seed(1)
        noisy = model(ids, mask)
        assert not torch.allclose(noisy, reference, atol=1e-4)  # dropout acts in training
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert model.body.config._attn_implementation == implementation


def _sentiment(tiny_model_dir, toy_task_files):
    from coldfusion.tasks import TaskSpec

    encoder = Encoder.load(str(tiny_model_dir))
    task = load_task(TaskSpec(name="sentiment", path=toy_task_files["sentiment"]))
    return encoder, task, encode(task.train, encoder.tokenizer, 32), encode(task.test, encoder.tokenizer, 32)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")


def test_auto_on_a_cuda_gpu_takes_bf16_where_the_gpu_has_it():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU here")
    gpu = torch.device("cuda")
    assert resolve_precision("auto", gpu) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    assert resolve_precision("fp16", gpu) == torch.float16
    assert resolve_compute("cuda", "auto", 1).device.type == "cuda"


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_bf16), pytest.param("cuda", marks=CUDA)])
def test_bf16_finetuning_learns_and_leaves_an_fp32_model_with_fp32_updates(tiny_model_dir, toy_task_files, device):
    encoder, task, train, test = _sentiment(tiny_model_dir, toy_task_files)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Classifier(encoder.new_body(), task.num_labels).place(device, dtype)
        finetune(model, train, None, FinetuneSettings(epochs=3, batch_size=16, lr=1e-3), seed=0)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert not any(isinstance(m, FastDropout) for m in model.modules())
        results[dtype] = (evaluate(model, test)["accuracy"], model)
    assert results[torch.bfloat16][0] >= 0.9 and results[torch.float32][0] >= 0.9  # the toy task is easy
    trained = dict(results[torch.bfloat16][1].body.named_parameters())["encoder.layer.0.attention.self.query.weight"]
    # fp32 masters: the trained weights are not confined to bf16's grid
    assert not torch.equal(trained, trained.to(torch.bfloat16).float())


@needs_bf16
def test_bf16_features_of_the_bundled_minilm_stay_close_to_fp32_ones():
    """Stated tolerance: per example, the bf16 sentence embedding has cosine similarity at
    least 0.99 with the fp32 one (MiniLM, real movie reviews)."""
    from coldfusion.models.names import default_model_dir

    encoder = Encoder.load(str(default_model_dir()))
    data = encode(load_task("movie_sentiment").test.head(64), encoder.tokenizer, 128)
    features = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = Classifier(encoder.new_body(), 2).place(CPU, dtype)
        features[dtype] = extract_features(model, data, batch_size=32)
    cosine = torch.nn.functional.cosine_similarity(features[torch.float32], features[torch.bfloat16], dim=1)
    assert cosine.min().item() >= 0.99, cosine.min().item()


def _config(tmp_path, tiny_model_dir, toy_task_files, **compute) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}],
        "output_dir": str(tmp_path / "runs"), **compute}))
    return path


def test_what_this_machine_cannot_run_is_a_clear_error_before_anything_is_written(
        tmp_path, tiny_model_dir, toy_task_files):
    from test_cli import invoke

    cases = [({"precision": "fp16"}, "precision 'fp16' needs a CUDA or MPS device, not the CPU"),
             ({"device": "tpu"}, "'device'"), ({"precision": "fp8"}, "'precision'"), ({"threads": 0}, "'threads'")]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "device 'cuda': torch sees no CUDA GPU here"))
    for compute, message in cases:
        result = invoke("run", _config(tmp_path, tiny_model_dir, toy_task_files, **compute))
        assert result.exit_code == 2, (compute, result.output)
        assert message in " ".join(result.output.split()), (compute, result.output)
        assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_simulated_contributors_get_a_gpu_share_only_where_there_are_gpus(tmp_path, tiny_model_dir, toy_task_files):
    from coldfusion.collab.config import load_config
    from coldfusion.collab.flower.simulation import client_resources

    config = load_config(_config(tmp_path, tiny_model_dir, toy_task_files, threads=2))
    assert client_resources(config, gpus=0) == {"num_cpus": 2, "num_gpus": 0.0}
    assert client_resources(config, gpus=1) == {"num_cpus": 2, "num_gpus": 1.0}
    shared = config.model_copy(update={"flower": config.flower.model_copy(update={"client_gpus": 0.25})})
    assert client_resources(shared, gpus=2)["num_gpus"] == 0.25
    on_cpu = config.model_copy(update={"device": "cpu"})
    assert client_resources(on_cpu, gpus=1)["num_gpus"] == 0.0
    auto = config.model_copy(update={"threads": "auto"})
    assert client_resources(auto, gpus=0)["num_cpus"] == runtime.available_cores()
