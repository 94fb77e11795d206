"""A contributor trains, computes its statistics and scores bases on the device its node
chooses (node config `device`); what it sends back is on the CPU, ready to travel.

The CUDA cases run where torch sees a GPU and are skipped elsewhere."""

import pytest
import torch
from test_loop import tiny_config

from coldfusion.collab.consortium import ConsortiumSettings, contributor_for
from coldfusion.collab.node import NodeSettings
from coldfusion.contributors.heads import HeadStore
from coldfusion.encodings import EncodingSettings
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.runtime import resolve_device
from coldfusion.models.encoder import Encoder
from coldfusion.tasks import load_task

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _contributor(tiny_model_dir, toy_task_files, tmp_path, device, precision="auto", **update):
    config = tiny_config(tiny_model_dir, toy_task_files, tmp_path).model_copy(update=update)
    consortium = ConsortiumSettings.of_run(config, "run1")
    node = NodeSettings(model=str(tiny_model_dir), device=device, precision=precision, threads=1,
                        state_dir=tmp_path / "state")
    return contributor_for(consortium, node, load_task(config.tasks[0]), Encoder.load(str(tiny_model_dir)))


@pytest.mark.parametrize("device", DEVICES)
def test_a_contributor_trains_and_scores_on_its_nodes_device(tiny_model_dir, toy_task_files, tmp_path, device):
    contributor = _contributor(tiny_model_dir, toy_task_files, tmp_path, device)
    assert contributor.device.type == device
    base = contributor.encoder.pretrained
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = contributor.contribute(base, iteration=1)
    if device == "cuda":  # the model and its batches were on the GPU
        assert torch.cuda.max_memory_allocated() > 0
    assert all(t.device.type == "cpu" for t in result.body.values())  # what travels is on the CPU
    assert result.body.keys() == base.keys()
    assert all(torch.isfinite(t).all() for t in result.body.values() if t.is_floating_point())
    assert any(not torch.equal(result.body[k], base[k]) for k in base)  # it trained
    head = HeadStore(tmp_path / "state" / "run1" / contributor.name).before(2)
    assert head is not None and all(t.device.type == "cpu" for t in head.values())

    scores = contributor.evaluate(result.body)
    on_cpu = _contributor(tiny_model_dir, toy_task_files, tmp_path / "cpu", "cpu").evaluate(result.body)
    tests = len(scores["test_correct"])
    assert tests == len(on_cpu["test_correct"]) and set(scores["test_correct"]) <= {"0", "1"}
    # the same body scored on this device and on the CPU: features equal up to rounding
    assert abs(scores["accuracy"] - on_cpu["accuracy"]) <= 1 / tests + 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_and_small_contributions_follow_the_device(tiny_model_dir, toy_task_files, tmp_path, device):
    """Gram matrices (RegMean), a FISH-masked sparse delta, and LoRA factors are computed on
    the node's device and sent from the CPU; the Gram matrices of one body agree across devices."""
    from coldfusion.collab.config import FusionSettings

    gram = {"fusion": FusionSettings(method="regmean", statistics_examples=16)}
    contributor = _contributor(tiny_model_dir, toy_task_files, tmp_path, device, **gram)
    result = contributor.contribute(contributor.encoder.pretrained, iteration=1)
    grams = result.stats["gram"]
    assert grams and all(g.device.type == "cpu" and torch.isfinite(g).all() for g in grams.values())
    from coldfusion.models.encoder import Classifier
    from coldfusion.training.statistics import gram_matrices

    def gram_on(where: str):  # of one body, the pretrained one
        model = Classifier(contributor.encoder.new_body(), contributor.task.num_labels).to(where)
        return gram_matrices(model, contributor.train, 16)

    here, cpu = gram_on(device), gram_on("cpu")
    for name in cpu:
        assert torch.allclose(here[name], cpu[name], rtol=1e-4, atol=1e-3), name

    for encoding in (EncodingSettings(kind="sparse", density=0.1, score="fisher"), EncodingSettings(kind="lora")):
        small = _contributor(tiny_model_dir, toy_task_files, tmp_path / encoding.kind, device, contribution=encoding)
        sent = small.contribute(small.encoder.pretrained, iteration=1)
        assert sent.encoding["kind"] == encoding.kind and sent.body
        assert all(t.device.type == "cpu" and (not t.is_floating_point() or torch.isfinite(t).all())
                   for t in sent.body.values())


def test_a_device_the_node_does_not_have_is_an_error_that_says_so(tiny_model_dir, toy_task_files, tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in (("cuda",) if torch.cuda.is_available() else ("cpu", "mps"))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match="sees no CUDA GPU" if count == 0 else f"only {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")
    with pytest.raises(ColdFusionError, match="node config: unknown device 'gpu0'"):
        _contributor(tiny_model_dir, toy_task_files, tmp_path, "gpu0")
    # a node's own precision is checked on the node, with what it found
    with pytest.raises(ColdFusionError, match="node config: unknown precision 'fp8'"):
        _contributor(tiny_model_dir, toy_task_files, tmp_path, "cpu", precision="fp8")
    with pytest.raises(ColdFusionError, match="node config: precision 'fp16' needs a CUDA or MPS device"):
        _contributor(tiny_model_dir, toy_task_files, tmp_path, "cpu", precision="fp16")
