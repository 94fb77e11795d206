"""`coldfusion merge` on small checkpoints with heads of different shapes."""

import json

import pytest
import torch
import yaml
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)
from typer.testing import CliRunner

from coldfusion.cli import app
from coldfusion.fusion import fuse_files
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import save_tensors
from coldfusion.io.model_files import sha256_file
from coldfusion.merge.config import MergeConfig, load_merge_config
from coldfusion.merge.run import merge_checkpoints

SMALL = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=40)


def finetuned_copies(base_body, cls, config_cls, root, labels=(2, 3, 5), **extra):
    """Classification checkpoints that share the base body, nudged differently, with heads of other sizes."""
    dirs = []
    for i, n in enumerate(labels):
        torch.manual_seed(10 + i)
        model = cls(config_cls(**SMALL, num_labels=n, **extra))
        body = getattr(model, model.base_model_prefix)
        body.load_state_dict(base_body.state_dict(), strict=False)
        with torch.no_grad():
            for p in body.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"ft{i}")
        dirs.append(root / f"ft{i}")
    return dirs


@pytest.fixture
def bert_family(tmp_path):
    torch.manual_seed(0)
    base = BertModel(BertConfig(**SMALL))
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base", finetuned_copies(base, BertForSequenceClassification, BertConfig, tmp_path)


def body_of(path):
    return AutoModel.from_pretrained(path).state_dict()


def test_ties_merge_of_heads_with_different_shapes(bert_family, tmp_path):
    base, dirs = bert_family
    cfg = MergeConfig(method="ties", params={"density": 0.5, "lambda": 0.8}, base_model=str(base),
                      models=[{"model": str(d)} for d in dirs], output=tmp_path / "out")
    out = merge_checkpoints(cfg)
    merged = body_of(out)
    # same numbers as fusing the bodies directly (a classifier's "bert." prefix stripped)
    bodies = []
    for d in dirs:
        bodies.append(tmp_path / f"{d.name}-body.safetensors")
        save_tensors(bodies[-1], BertForSequenceClassification.from_pretrained(d).bert.state_dict())
    save_tensors(tmp_path / "base-body.safetensors", body_of(base))
    expected = fuse_files(bodies, "ties", base=tmp_path / "base-body.safetensors", density=0.5, scale=0.8)
    for k, v in expected.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "base" and "ties" in front["tags"]  # portable: the directory's name, no path
    record = json.loads((out / "coldfusion_merge.json").read_text())
    assert record["base_sha256"] == {"model.safetensors": sha256_file(base / "model.safetensors")}
    assert record["coldfusion_version"] and str(tmp_path) not in card
    assert record["params"] == {"density": 0.5, "lambda": 0.8}
    assert record["inputs"][0]["sha256"]["model.safetensors"] == sha256_file(dirs[0] / "model.safetensors")
    assert not any(k.startswith("classifier") for k in merged)


def test_keep_base_head(tmp_path):
    torch.manual_seed(1)
    base_body = BertModel(BertConfig(**SMALL))
    base_cls = BertForSequenceClassification(BertConfig(**SMALL, num_labels=4))
    base_cls.bert.load_state_dict(base_body.state_dict())
    base_cls.save_pretrained(tmp_path / "base-cls")
    dirs = finetuned_copies(base_body, BertForSequenceClassification, BertConfig, tmp_path)
    out = merge_checkpoints(MergeConfig(method="average", base_model=str(tmp_path / "base-cls"), heads="keep_base",
                                        models=[{"model": str(d)} for d in dirs], output=tmp_path / "out"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert torch.equal(model.classifier.weight, base_cls.classifier.weight)  # the base's 4-label head
    ft = [BertForSequenceClassification.from_pretrained(d).bert.state_dict() for d in dirs]
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(model.bert.state_dict()[name], sum(s[name] for s in ft) / 3, atol=1e-6)


def test_roberta_classifiers_without_pooler_copy_it_from_the_base(tmp_path):
    torch.manual_seed(2)
    extra = {"pad_token_id": 1}
    base = RobertaModel(RobertaConfig(**SMALL, **extra))
    base.save_pretrained(tmp_path / "base")
    dirs = finetuned_copies(base, RobertaForSequenceClassification, RobertaConfig, tmp_path, labels=(2, 3), **extra)
    out = merge_checkpoints(MergeConfig(method="task_arithmetic", base_model=str(tmp_path / "base"),
                                        models=[{"model": str(d)} for d in dirs], output=tmp_path / "out"))
    merged = body_of(out)
    assert torch.equal(merged["pooler.dense.weight"], base.state_dict()["pooler.dense.weight"])
    assert "pooler.dense.weight" in json.loads((out / "coldfusion_merge.json").read_text())["copied_from_base"]
    # without a base there is nothing to copy the pooler from
    with pytest.raises(ColdFusionError, match=r"not in every input; give a `base_model`"):
        merge_checkpoints(MergeConfig(method="average", models=[{"model": str(d)} for d in dirs],
                                      output=tmp_path / "out2"))


def test_refusals(bert_family, tmp_path):
    base, dirs = bert_family
    models = [{"model": str(d)} for d in dirs]
    with pytest.raises(ColdFusionError, match="`base_model` is required for method 'ties'"):
        merge_checkpoints(MergeConfig(method="ties", models=models, output=tmp_path / "o"))
    with pytest.raises(ColdFusionError, match="needs statistics computed on each model's training data"):
        merge_checkpoints(MergeConfig(method="fisher", models=models, output=tmp_path / "o"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(ColdFusionError, match="exists; choose another `output`"):
        merge_checkpoints(MergeConfig(models=models, output=tmp_path / "exists"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = BertForSequenceClassification.from_pretrained(dirs[0])
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    model.config.save_pretrained(pickled)
    with pytest.raises(ColdFusionError, match="pickle that can run code"):
        merge_checkpoints(MergeConfig(models=[{"model": str(pickled)}, *models], output=tmp_path / "o"))
    out = merge_checkpoints(MergeConfig(models=[{"model": str(pickled)}, *models[1:]], allow_pickle=True,
                                        output=tmp_path / "o"))
    assert (out / "model.safetensors").exists()
    assert not (tmp_path / "o").with_name(".o").exists()


def test_merge_through_the_cli(bert_family, tmp_path):
    base, dirs = bert_family
    config = {"method": "dare", "params": {"density": 0.9, "variant": "ties"}, "base_model": str(base),
              "models": [{"model": str(d), "weight": w} for d, w in zip(dirs, (1, 2, 1), strict=True)],
              "output": str(tmp_path / "merged")}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(path)])
    assert result.exit_code == 0, result.output
    assert set(body_of(tmp_path / "merged")) == set(body_of(base))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "params": {"densty": 0.9}}))
    result = CliRunner().invoke(app, ["merge", str(bad)])
    assert result.exit_code == 2 and "has no parameter ['densty']" in result.output
    with pytest.raises(ColdFusionError, match="unknown key 'modles'"):
        bad.write_text(yaml.safe_dump({"modles": [], "output": "x"}))
        load_merge_config(bad)


def test_tokenizer_travels_with_the_merge(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = merge_checkpoints(MergeConfig(models=[{"model": str(tiny_model_dir)}] * 2, output=tmp_path / "out"))
    assert AutoTokenizer.from_pretrained(out)("good movie")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_model_dir)("good movie")["input_ids"]
    merged, original = body_of(out), body_of(tiny_model_dir)
    assert all(torch.equal(merged[k], original[k]) for k in original)  # merging a model with itself


def test_base_without_tensors_the_inputs_have_is_refused(tmp_path):
    torch.manual_seed(3)
    extra = {"pad_token_id": 1}
    body = RobertaModel(RobertaConfig(**SMALL, **extra))
    body.save_pretrained(tmp_path / "plain")  # has the pooler
    classifier_base = RobertaForSequenceClassification(RobertaConfig(**SMALL, num_labels=2, **extra))
    classifier_base.save_pretrained(tmp_path / "cls-base")  # has no pooler
    with pytest.raises(ColdFusionError, match=r"lacks body tensors \['pooler.dense.bias'"):
        merge_checkpoints(MergeConfig(method="task_arithmetic", base_model=str(tmp_path / "cls-base"),
                                      models=[{"model": str(tmp_path / "plain")}] * 2, output=tmp_path / "o"))


def test_default_names_the_bundled_minilm_and_the_card_names_it_portably(tmp_path):
    """`default` is the MiniLM this install carries, never a hub lookup; the card names the
    base by its hub id and checksums, not by a path inside the virtualenv."""
    from coldfusion.models.names import DEFAULT_HUB_ID, default_model_dir

    out = merge_checkpoints(MergeConfig(method="task_arithmetic", base_model="default",
                                        models=[{"model": "default"}, {"model": "default"}], output=tmp_path / "m"))
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == DEFAULT_HUB_ID
    assert str(default_model_dir()) not in card
    record = json.loads((out / "coldfusion_merge.json").read_text())
    assert record["base_sha256"] == {"model.safetensors": sha256_file(default_model_dir() / "model.safetensors")}
    merged, original = AutoModel.from_pretrained(out).state_dict(), AutoModel.from_pretrained(default_model_dir())
    assert all(torch.equal(merged[k], v) for k, v in original.state_dict().items() if k in merged)
