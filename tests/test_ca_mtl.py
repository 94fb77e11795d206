"""CA-MTL: the conditioning is the identity at start, its parts compute what the publication
says (worked out by hand), the bottom half stays frozen in training, and `coldfusion
multitask` with `model: ca_mtl` stores a body like any other base."""

import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
)

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import load_tensors
from coldfusion.models.ca_mtl import BlockDiagonalAttention, CaMtlEncoder, ConditionalAdapter, FiLM
from coldfusion.models.encoder import Encoder, body_tensors
from coldfusion.multitask.config import MultitaskConfig
from coldfusion.multitask.run import run_multitask
from coldfusion.repository import Repository

BODIES = {
    "bert": lambda: BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)),
    "roberta": lambda: RobertaModel(RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=70)),
    "distilbert": lambda: DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=4, n_heads=2,
                                                           hidden_dim=64, max_position_embeddings=64)),
}


def inputs(batch: int = 3, length: int = 10) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 7:] = 0  # padding in one row
    return {"input_ids": torch.randint(5, 50, (batch, length), generator=g), "attention_mask": mask}


def test_film_with_zero_hypernetwork_is_the_identity_and_otherwise_scales_and_shifts():
    film = FiLM(task_dim=4, features=3)
    x, z = torch.randn(2, 5, 3), torch.randn(2, 4)
    assert torch.equal(film(x, z), x)  # exactly: (1 + 0) x + 0
    with torch.no_grad():  # gamma = 2 and beta = 1 for every feature whatever z: 3x + 1
        film.hypernetwork.bias.copy_(torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(film(x, z), 3 * x + 1)


@pytest.mark.parametrize("family", sorted(BODIES))
def test_the_wrapped_encoder_starts_as_the_pretrained_one(family):
    torch.manual_seed(0)
    body = BODIES[family]().eval()
    reference = body(**inputs()).last_hidden_state
    encoder = CaMtlEncoder(body, num_tasks=2, max_length=16).eval()
    for task in (0, 1):
        out = encoder.for_task(task)(**inputs()).last_hidden_state
        assert torch.allclose(out, reference, atol=1e-5)
    # the body's own weights keep their names: the trained body is stored like any base
    assert set(body_tensors(body)) == set(BODIES[family]().state_dict())
    # bottom half frozen (embeddings and 2 of 4 layers), upper half and conditioning trainable
    frozen = {n for n, p in encoder.body.named_parameters() if not p.requires_grad}
    assert any("embeddings" in n for n in frozen) and frozen
    assert all(".0." in n or ".1." in n or "embeddings" in n for n in frozen)
    assert all(p.requires_grad for m in encoder.conditioning() for p in m.parameters())


def test_conditional_attention_term_is_block_diagonal_as_specified():
    term = BlockDiagonalAttention(task_dim=2, max_length=6, blocks=3)  # blocks of 2 x 2
    with torch.no_grad():
        term.blocks.copy_(torch.arange(12, dtype=torch.float32).view(3, 2, 2))
        # gamma_n = z_0 * (n + 1), beta_n = z_1 * 10
        term.hypernetwork.weight.copy_(torch.tensor([[1.0, 0], [2, 0], [3, 0], [0, 10], [0, 10], [0, 10]]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # task a: gamma (1, 2, 3), beta 0; task b: gamma 0, beta 10
    m = term(z, 6)
    assert m.shape == (2, 1, 6, 6)
    a = torch.arange(12, dtype=torch.float32).view(3, 2, 2)
    for row, (gamma, beta) in enumerate([((1, 2, 3), (0, 0, 0)), ((0, 0, 0), (10, 10, 10))]):
        expected = torch.block_diag(*[(1 + gamma[n]) * a[n] + beta[n] for n in range(3)])
        assert torch.equal(m[row, 0], expected)
    assert torch.equal(m[1, 0, 0:2, 2:6], torch.zeros(2, 4))  # off the blocks: nothing, even with a shift
    assert torch.equal(term(z, 4), m[:, :, :4, :4])  # a shorter batch: the top-left corner
    longer = term(z, 8)  # past max_length: no term
    assert torch.equal(longer[:, :, :6, :6], m) and not longer[:, :, 6:].any() and not longer[:, :, :, 6:].any()


def test_the_attention_term_changes_the_output_and_only_for_conditioned_calls():
    torch.manual_seed(0)
    body = BODIES["bert"]().eval()
    reference = body(**inputs()).last_hidden_state
    encoder = CaMtlEncoder(body, num_tasks=2, max_length=16).eval()
    with torch.no_grad():
        for term in encoder.attention:
            term.blocks.normal_(std=3.0)
    assert not torch.allclose(encoder.for_task(0)(**inputs()).last_hidden_state, reference, atol=1e-3)
    assert torch.allclose(body(**inputs()).last_hidden_state, reference, atol=1e-6)  # the body alone: unchanged


def test_conditional_adapter_starts_as_the_identity():
    adapter = ConditionalAdapter(task_dim=4, hidden=12)
    x = torch.randn(2, 3, 12)
    assert torch.equal(adapter(x, torch.randn(2, 4)), x)
    assert adapter.down.out_features == 4  # hidden / 3


def test_a_body_outside_the_bert_family_is_refused():
    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ColdFusionError, match="BERT-family encoder"):
        CaMtlEncoder(gpt2, num_tasks=2, max_length=16)


def test_multitask_ca_mtl_trains_the_upper_half_and_stores_a_plain_body(tiny_model_dir, toy_task_files, tmp_path):
    config = MultitaskConfig.model_validate({
        "name": "ca-mtl", "model": str(tiny_model_dir), "threads": 1, "max_length": 32,
        "tasks": [{"name": n, "path": str(p)} for n, p in toy_task_files.items()],
        "validation_examples": 32,
        "multitask": {"model": "ca_mtl", "sampler": "uncertainty", "steps": 10,
                      "optimizer": {"batch_size": 8, "lr": 1e-3, "head_lr": 5e-3}},
        "output_dir": str(tmp_path / "runs"),
    })
    run_dir = run_multitask(config)
    summary = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    assert summary["model"] == "ca_mtl" and summary["tasks"] == list(toy_task_files)
    repo = Repository(run_dir / "repository")
    trained = repo.load(repo.version(summary["version"]).sha256)
    pretrained = body_tensors(Encoder.load(str(tiny_model_dir)).new_body())
    assert set(trained) == set(pretrained)  # a body like any other base
    bottom = [k for k in pretrained if k.startswith(("embeddings.", "encoder.layer.0."))]
    top = [k for k in pretrained if k.startswith("encoder.layer.1.")]
    assert bottom and top
    assert all(torch.equal(trained[k], pretrained[k]) for k in bottom)  # frozen: not a bit changed
    assert any(not torch.equal(trained[k], pretrained[k]) for k in top)
    conditioning = load_tensors(run_dir / "ca_mtl.safetensors")
    assert "task_embedding.weight" in conditioning and conditioning["task_embedding.weight"].shape[0] == 2
    assert any(conditioning[k].abs().sum() > 0 for k in conditioning if "hypernetwork" in k)  # it learned
    # trainable: the upper half, the conditioning and the two heads (hidden 32, a few labels each)
    upper = sum(v.numel() for k, v in pretrained.items() if k not in bottom)
    heads = summary["trainable_params"] - upper - sum(v.numel() for v in conditioning.values())
    assert 2 * (32 * 2 + 2) <= heads <= 2 * (32 * 10 + 10)
    # the stored body evaluates like any base
    encoder = Encoder.from_repository(repo, repo.version(summary["version"]))
    assert encoder.new_body() is not None
