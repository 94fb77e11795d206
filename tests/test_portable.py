"""A repository stands alone: copied elsewhere, with the model directory (the virtualenv's
bundled model) it was made from gone, it still exports, evaluates and ranks."""

import json
import shutil

import torch
import yaml
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from coldfusion.cli import app
from coldfusion.io.model_files import sha256_file
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository
from coldfusion.repository.export import PROVENANCE_FILE

runner = CliRunner()


def made_elsewhere(tiny_model_dir, tmp_path) -> tuple[Repository, dict]:
    """A repository made from a model inside a virtualenv, then moved; the venv removed.
    Returns the moved repository and the fused body of its version 2."""
    venv_model = tmp_path / "old-venv" / "site-packages" / "tiny-bert"
    shutil.copytree(tiny_model_dir, venv_model)
    encoder = Encoder.load(str(venv_model))
    repo = Repository(tmp_path / "made-here")
    base = repo.add_version(encoder.pretrained, model_source=encoder.source, model_files=encoder.files_dir,
                            model_name=encoder.name, iteration=0)
    for name, by in (("a", 0.01), ("b", 0.03)):
        repo.add_contribution({k: v + by if v.is_floating_point() else v for k, v in encoder.pretrained.items()},
                              base_version=base.id, contributor=name, task="t", num_examples=10)
    fused = repo.fuse(base.id, [1, 2])
    expected = repo.load_version(fused.id)
    shutil.copytree(repo.root, tmp_path / "moved" / "repo")
    shutil.rmtree(repo.root)
    shutil.rmtree(tmp_path / "old-venv")  # the virtualenv is rebuilt elsewhere: that path is gone
    return Repository(tmp_path / "moved" / "repo", create=False), expected


def test_a_moved_repository_exports_with_a_model_card_and_provenance(tiny_model_dir, tmp_path):
    repo, expected = made_elsewhere(tiny_model_dir, tmp_path)
    assert runner.invoke(app, ["verify", str(repo.root)]).exit_code == 0
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(repo.root), "latest", str(out)])
    assert result.exit_code == 0, result.output
    body = AutoModel.from_pretrained(out).state_dict()
    assert all(torch.equal(body[k], v) for k, v in expected.items())
    assert AutoTokenizer.from_pretrained(out)("good film")["input_ids"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-bert" and str(tmp_path) not in card
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["version"] == 2 and [v["version"] for v in record["lineage"]] == [2, 1]
    assert {c["contributor"] for c in record["lineage"][0]["contributions"]} == {"a", "b"}
    assert record["files"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert record["body_sha256"] == repo.version(2).sha256 and record["coldfusion_version"]

    again = runner.invoke(app, ["export", str(repo.root), "1", str(out)])
    assert again.exit_code == 2 and "exists and is not empty" in again.output
    assert json.loads((out / PROVENANCE_FILE).read_text())["version"] == 2  # untouched
    replaced = runner.invoke(app, ["export", str(repo.root), "1", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and json.loads((out / PROVENANCE_FILE).read_text())["version"] == 1


def test_a_moved_repository_evaluates_and_ranks(tiny_model_dir, toy_task_files, tmp_path):
    repo, _ = made_elsewhere(tiny_model_dir, tmp_path)
    config = tmp_path / "evaluate.yaml"
    config.write_text(yaml.safe_dump({
        "name": "moved", "bodies": [{"name": "fused", "repository": str(repo.root), "version": "latest"}],
        "tasks": [{"name": "sentiment", "path": str(toy_task_files["sentiment"])}], "protocols": ["linear_probe"],
        "seeds": [0], "train_examples": 80, "test_examples": 40, "validation_examples": 20, "max_length": 32,
        "output_dir": str(tmp_path / "eval")}))
    result = runner.invoke(app, ["evaluate", str(config)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "eval" / "moved" / "results.jsonl").read_text().splitlines()]
    assert [(r["body"], r["protocol"]) for r in rows] == [("fused", "linear_probe")] and 0 <= rows[0]["accuracy"] <= 1

    from test_selection import write_settings

    ranked = runner.invoke(app, ["rank", f"{repo.root}@v1", f"{repo.root}@v2", "--target",
                                 str(toy_task_files["sentiment"]), "--settings", str(write_settings(tmp_path)),
                                 "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "rows.jsonl")])
    assert ranked.exit_code == 0, ranked.output
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2


def test_a_repository_made_before_model_files_were_stored_can_adopt_them(tiny_model_dir, tmp_path):
    repo = Repository(tmp_path / "old")
    encoder = Encoder.load(str(tiny_model_dir))
    repo.add_version(encoder.pretrained, model_source=str(tmp_path / "gone"))  # a path that no longer exists
    verified = runner.invoke(app, ["verify", str(repo.root)])
    assert verified.exit_code == 0 and "1 versions name their model only by a path" in " ".join(verified.output.split())
    failed = runner.invoke(app, ["export", str(repo.root), "latest", str(tmp_path / "out")])
    assert failed.exit_code == 2 and "coldfusion adopt-model" in " ".join(failed.output.split())
    adopted = runner.invoke(app, ["adopt-model", str(repo.root), str(tiny_model_dir)])
    assert adopted.exit_code == 0 and "for 1 versions" in adopted.output
    assert runner.invoke(app, ["export", str(repo.root), "latest", str(tmp_path / "out")]).exit_code == 0


def test_a_damaged_model_file_is_refused_and_reported(tiny_model_dir, tmp_path):
    repo, _ = made_elsewhere(tiny_model_dir, tmp_path)
    stored = sorted(repo.files.iterdir())
    stored[0].write_bytes(b"not what was stored")
    failed = runner.invoke(app, ["export", str(repo.root), "latest", str(tmp_path / "out")])
    assert failed.exit_code == 2 and "is missing or corrupt" in " ".join(failed.output.split())
    assert not (tmp_path / "out").exists()
    verified = runner.invoke(app, ["verify", str(repo.root)])
    squeezed = "".join(verified.output.split())  # rich wraps long lines
    assert verified.exit_code == 1 and f"files/{stored[0].name}:doesnotmatchitschecksum" in squeezed
