"""Contributions from outside a run, through the CLI: contribute, fuse (validated), verify."""

import os
import time

import torch
from safetensors.torch import save_file
from transformers import AutoModel, BertForSequenceClassification
from typer.testing import CliRunner

from coldfusion.cli import app
from coldfusion.io.checkpoint import sha256_bytes
from coldfusion.models.encoder import body_tensors
from coldfusion.repository import Repository

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def test_contribute_fuse_and_verify_through_the_cli(tmp_path, tiny_model_dir):
    repo = Repository(tmp_path / "repo")
    pretrained = body_tensors(AutoModel.from_pretrained(tiny_model_dir))
    base = repo.add_version(pretrained, model_source=str(tiny_model_dir))

    def moved(by: float):
        return {k: v + by if v.is_floating_point() else v for k, v in pretrained.items()}

    save_file(moved(0.01), tmp_path / "a.safetensors")
    classifier = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    with torch.no_grad():
        for p in classifier.bert.parameters():
            p.add_(0.03)
    classifier.save_pretrained(tmp_path / "b")  # a model directory: the body is under "bert."
    poisoned = moved(0.0)
    poisoned["embeddings.word_embeddings.weight"][3, 3] = float("nan")
    save_file(poisoned, tmp_path / "c.safetensors")
    save_file(moved(1.0), tmp_path / "d.safetensors")  # a hundredfold the others' update
    torch.save(moved(0.02), tmp_path / "e.bin")

    for name, upload in [("a", "a.safetensors"), ("b", "b")]:
        result = invoke("contribute", repo.root, tmp_path / upload, "--base", base.id, "--contributor", name,
                        "--task", "t", "--examples", 10)
        assert result.exit_code == 0, result.output
    for name, upload, why in [("c", "c.safetensors", "refused (finite): against version 1: tensor "
                                                     "'embeddings.word_embeddings.weight' has 1 non-finite"),
                              ("d", "d.safetensors", "refused (norm): against version 1: delta norm")]:
        result = invoke("contribute", repo.root, tmp_path / upload, "--base", "latest", "--contributor", name,
                        "--task", "t", "--examples", 10)
        assert result.exit_code == 2 and why in result.text, result.output
    assert [(r.contributor, r.rule) for r in repo.refusals()] == [("c", "finite"), ("d", "norm")]
    refused = invoke("contribute", repo.root, tmp_path / "e.bin", "--base", "1", "--contributor", "e", "--task", "t",
                     "--examples", 10)
    assert refused.exit_code == 2 and "is a pickle, which can run code" in refused.text
    allowed = invoke("contribute", repo.root, tmp_path / "e.bin", "--base", "1", "--contributor", "e", "--task", "t",
                     "--examples", 10, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output

    result = invoke("fuse", repo.root, "--method", "average")
    assert result.exit_code == 0, result.output
    assert "version 2 = average of contributions [1, 2, 3]" in result.text and "refused" not in result.text
    fused = repo.load_version(2)
    key = "encoder.layer.0.output.dense.bias"
    assert torch.allclose(fused[key], pretrained[key] + (0.01 + 0.03 + 0.02) / 3, atol=1e-6)
    nothing = invoke("fuse", repo.root)
    assert nothing.exit_code == 2 and "no contributions waiting" in nothing.text

    listed = invoke("versions", repo.root)
    assert listed.exit_code == 0 and "1,2,3" in "".join(listed.output.split())  # the contributions of version 2
    assert invoke("verify", repo.root).exit_code == 0
    (repo.objects / ".stray.tmp").write_bytes(b"half a file")
    path = repo.path_of(repo.version(2).sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    unindexed = sha256_bytes(b"a body whose index row never came") + ".safetensors"
    (repo.objects / unindexed).write_bytes(b"a body whose index row never came")
    damaged = invoke("verify", repo.root, "--clean")
    assert damaged.exit_code == 1 and "does not match its checksum (corrupt)" in damaged.text
    # younger than an hour: a running service may be about to index them
    assert "1 temporary files, 1 unindexed objects" in damaged.text
    assert "except 2 younger than 60 minutes" in damaged.text
    assert (repo.objects / ".stray.tmp").exists() and (repo.objects / unindexed).exists()
    for name in (".stray.tmp", unindexed):
        os.utime(repo.objects / name, (time.time() - 7200, time.time() - 7200))
    negative = invoke("verify", repo.root, "--clean", "--min-age", "-1")
    assert negative.exit_code == 2 and "Invalid value for '--min-age'" in negative.text
    assert (repo.objects / ".stray.tmp").exists()  # refused before anything was touched
    cleaned = invoke("verify", repo.root, "--clean")
    assert "deleted: 1 temporary files, 1 unindexed objects" in cleaned.text and "except" not in cleaned.text
    assert not (repo.objects / ".stray.tmp").exists() and not (repo.objects / unindexed).exists()


def test_fuse_rejects_bad_options_clearly(tmp_path):
    for command in ("verify", "versions", "fuse"):
        result = invoke(command, tmp_path / "nowhere")
        assert result.exit_code == 2 and "no repository at" in result.text, command
    assert not (tmp_path / "nowhere").exists()
    repo = Repository(tmp_path)
    base = repo.add_version({"w": torch.zeros(2)}, model_source="m")
    repo.add_contribution({"w": torch.ones(2)}, base_version=base.id, contributor="a", task="t", num_examples=1)
    result = invoke("fuse", tmp_path, "--param", "density")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.text
    result = invoke("fuse", tmp_path, "--stale", "sometimes")
    assert result.exit_code == 2 and "stale" in result.text
    result = invoke("fuse", tmp_path, "--method", "ties", "--param", "densty=0.5")
    assert result.exit_code == 2 and "'ties' has no parameter ['densty']" in result.text
