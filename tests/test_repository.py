import sqlite3

import pytest
import torch

from coldfusion.errors import ColdFusionError
from coldfusion.inputs import sha256_file
from coldfusion.repository import Repository


def body(value: float) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((3, 2), value), "layer.bias": torch.full((3,), value)}


def test_content_addressed_and_verified(tmp_path):
    repo = Repository(tmp_path / "repo")
    v1 = repo.add_version(body(1.0), model_source="m")
    v2 = repo.add_version(body(1.0), model_source="m")
    assert v1.sha256 == v2.sha256 and v1.id != v2.id
    path = repo.path_of(v1.sha256)
    assert sha256_file(path) == v1.sha256
    assert len(list(repo.objects.iterdir())) == 1  # stored once
    assert torch.equal(repo.load_version(v1.id)["layer.weight"], body(1.0)["layer.weight"])


def test_corrupt_checkpoint_is_detected(tmp_path):
    repo = Repository(tmp_path)
    v = repo.add_version(body(2.0), model_source="m")
    path = repo.path_of(v.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ColdFusionError, match="checksum mismatch"):
        repo.load_version(v.id)


def test_fusion_lineage(tmp_path):
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m", run="r", iteration=0)
    c1 = repo.add_contribution(body(1.0), base_version=base.id, contributor="a", task="ta", num_examples=10,
                               metrics={"validation_accuracy": 0.9})
    c2 = repo.add_contribution(body(3.0), base_version=base.id, contributor="b", task="tb", num_examples=30)
    v = repo.fuse(base.id, [c1.id, c2.id], method="average", run="r", iteration=1)
    assert v.parent == base.id and v.fusion["method"] == "average" and v.fusion["contributions"] == [c1.id, c2.id]
    assert torch.allclose(repo.load_version(v.id)["layer.bias"], torch.full((3,), 2.0))
    w = repo.fuse(base.id, [c1.id, c2.id], method="weighted")
    assert torch.allclose(repo.load_version(w.id)["layer.bias"], torch.full((3,), 2.5))  # (10*1 + 30*3) / 40
    assert [x.id for x in repo.lineage(v.id)] == [v.id, base.id]
    assert {c.id for c in repo.contributions(base_version=base.id)} == {c1.id, c2.id}
    assert repo.contributions(fused_into=w.id)[0].metrics == {"validation_accuracy": 0.9}
    assert repo.version(f"v{v.id}") == v and repo.version(v.sha256[:10]).sha256 == v.sha256
    repo.record_metrics(v.id, "ta", "linear_probe", {"accuracy": 0.8})
    assert repo.metrics(v.id)[0]["values"] == {"accuracy": 0.8}


def test_unknown_references_are_clear_errors(tmp_path):
    repo = Repository(tmp_path)
    with pytest.raises(ColdFusionError, match="no version 7"):
        repo.version(7)
    with pytest.raises(ColdFusionError, match="no version 3"):
        repo.add_contribution(body(1.0), base_version=3, contributor="a", task="t", num_examples=1)


def test_failed_transaction_leaves_index_unchanged(tmp_path, monkeypatch):
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    c = repo.add_contribution(body(1.0), base_version=base.id, contributor="a", task="t", num_examples=1)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(repo, "_insert_version", crash)
    with pytest.raises(RuntimeError):
        repo.fuse(base.id, [c.id])
    assert [v.id for v in repo.versions()] == [base.id]
    assert repo.contributions()[0].fused_into is None
    # no temporary files left behind in the object store
    assert all(p.suffix == ".safetensors" for p in repo.objects.iterdir())
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_old_index_without_stats_column_is_migrated(tmp_path):
    from coldfusion import repository

    old = "\n".join(line for line in repository.SCHEMA.splitlines() if not line.strip().startswith("stats TEXT"))
    assert old != repository.SCHEMA
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.executescript(old)
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    c = repo.add_contribution(body(1.0), base_version=base.id, contributor="a", task="t", num_examples=1,
                              stats={"fisher": body(0.5)})
    assert repo.contributions()[0].stats == {"fisher": c.stats["fisher"]}
    assert torch.equal(repo.load(c.stats["fisher"])["layer.bias"], torch.full((3,), 0.5))
