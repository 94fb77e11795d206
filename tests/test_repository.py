import sqlite3

import pytest
import torch

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.model_files import sha256_file
from coldfusion.repository import Repository
from coldfusion.repository.intake import Refused


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
    with pytest.raises(ColdFusionError, match="contribution 1 was already fused into version 2"):
        repo.fuse(base.id, [c1.id, c2.id], method="weighted")  # the lineage is never rewritten
    c3 = repo.add_contribution(body(1.5), base_version=base.id, contributor="c", task="ta", num_examples=10,
                               metrics={"validation_accuracy": 0.9})
    c4 = repo.add_contribution(body(2.5), base_version=base.id, contributor="d", task="tb", num_examples=30)
    w = repo.fuse(base.id, [c3.id, c4.id], method="weighted")
    assert torch.allclose(repo.load_version(w.id)["layer.bias"], torch.full((3,), 2.25))  # (10*1.5 + 30*2.5) / 40
    assert [x.id for x in repo.lineage(v.id)] == [v.id, base.id]
    assert {c.id for c in repo.contributions(base_version=base.id)} == {c1.id, c2.id, c3.id, c4.id}
    assert repo.contributions(fused_into=w.id)[0].metrics == {"validation_accuracy": 0.9}
    assert repo.contributions(fused_into=v.id)[0].fused_into == v.id and repo.verify().ok
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
    from coldfusion.repository.schema import SCHEMA

    old = "\n".join(line for line in SCHEMA.splitlines() if not line.strip().startswith("stats TEXT"))
    assert old != SCHEMA
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.executescript(old)
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    c = repo.add_contribution(body(1.0), base_version=base.id, contributor="a", task="t", num_examples=1,
                              stats={"fisher": body(0.5)})
    assert repo.contributions()[0].stats == {"fisher": c.stats["fisher"]}
    assert torch.equal(repo.load(c.stats["fisher"])["layer.bias"], torch.full((3,), 0.5))


def lineage_repository(root) -> Repository:
    """v1 <- v2 = fuse(contributions 1 and 2); contribution 3 refused by v2; contribution 4 waiting."""
    repo = Repository(root)
    base = repo.add_version(body(0.0), model_source="m")
    a, b = (repo.add_contribution(body(x), base_version=base.id, contributor=n, task="t", num_examples=1)
            for x, n in ((1.0, "a"), (2.0, "b")))
    c = repo.add_contribution(body(0.5), base_version=base.id, contributor="c", task="t", num_examples=1)
    stored = repo.path_of(c.sha256)
    admitted = stored.read_bytes()
    stored.write_bytes(admitted[:-4])  # damaged between admission and fusion: the fusion refuses it
    repo.fuse(base.id, [a.id, b.id, c.id])
    stored.write_bytes(admitted)
    repo.add_contribution(body(4.0), base_version=base.id, contributor="d", task="t", num_examples=1)
    assert repo.verify().ok, repo.verify().problems
    return repo


def test_the_index_refuses_to_rewrite_the_lineage(tmp_path):
    repo = lineage_repository(tmp_path)
    with pytest.raises(ColdFusionError, match="contribution 1 was already fused into version 2"):
        repo.fuse(1, [1, 4])
    with pytest.raises(ColdFusionError, match="contribution 3 was refused"):
        repo.fuse(1, [3])
    with pytest.raises(ColdFusionError, match="listed more than once"):
        repo.fuse(1, [4, 4])
    with pytest.raises(Refused, match=r"refused \(duplicate\): the same payload .* as contribution 1, which it sent"):
        repo.add_contribution(body(1.0), base_version=1, contributor="a", task="t", num_examples=1)
    # the rules hold in the index itself, whatever code writes to it
    db = sqlite3.connect(repo.root / "index.sqlite")
    for statement in ("UPDATE contributions SET fused_into = 2 WHERE id = 3",   # refused, then fused
                      "UPDATE contributions SET fused_into = 1 WHERE id = 1",   # fused twice
                      "UPDATE contributions SET rejected = 'later' WHERE id = 2",  # fused, then refused
                      "INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, metrics, "
                      "created) SELECT sha256, base_version, contributor, task, 1, '{}', created FROM contributions "
                      "WHERE id = 1"):  # the same payload again
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(statement)
    db.close()
    # a copy of another party's payload is not admitted, against any base
    with pytest.raises(Refused, match="as contribution 4, which another contributor sent against version 1"):
        repo.add_contribution(body(4.0), base_version=2, contributor="e", task="t", num_examples=1)
    assert [r.rule for r in repo.refusals()] == ["duplicate", "duplicate"]
    assert repo.verify().ok


FORCED = {
    "fused twice": (["UPDATE versions SET fusion = json_set(fusion, '$.contributions', json('[1, 2]')) WHERE id = 3",
                     "UPDATE contributions SET fused_into = 3 WHERE id = 1"],
                    "contribution 1 is fused into several versions [2, 3]"),
    "refused yet fused": (["UPDATE contributions SET rejected = 'bad' WHERE id = 1"],
                          "contribution 1 was refused and yet fused into version 2"),
    "not in the record": (["UPDATE contributions SET fused_into = 2 WHERE id = 4"],
                          "contribution 4 says it was fused into version 2, whose fusion record does not list it"),
    "duplicate payload": (["INSERT INTO contributions (sha256, base_version, contributor, task, num_examples, "
                           "metrics, created) SELECT sha256, base_version, contributor, task, 1, '{}', created "
                           "FROM contributions WHERE id = 4"],
                          "contributions 4,5 are the same payload from d against version 1 (a duplicate)"),
    "abandoned yet fused": (["UPDATE contributions SET abandoned = 'redone' WHERE id = 2"],
                            "abandoned contribution 2 is fused into version 2"),
    "built on abandoned": (["UPDATE versions SET abandoned = 'redone' WHERE id = 2"],
                           "version 3 builds on abandoned version 2"),
    "not rebased": (["UPDATE contributions SET base_version = 3 WHERE id = 2"],
                    "contribution 2 was trained from version 3 but fused onto version 1 without being rebased"),
}


@pytest.mark.parametrize("case", sorted(FORCED))
def test_verify_reports_each_lineage_violation_forced_into_the_index(tmp_path, case):
    repo = lineage_repository(tmp_path)
    repo.add_version(body(9.0), model_source="m", parent=2, fusion={"method": "average", "contributions": []})
    statements, message = FORCED[case]
    db = sqlite3.connect(repo.root / "index.sqlite")
    for trigger in ("fused_at_most_once", "refused_never_fused", "fused_never_refused"):
        db.execute(f"DROP TRIGGER {trigger}")  # by hand, past the index's own guards
    db.execute("DROP INDEX one_admission_per_payload")
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    report = repo.verify()
    assert not report.ok and any(message in p for p in report.problems), report.problems


def test_a_fusion_that_must_go_onto_the_newest_version_keeps_nothing_when_it_is_not(tmp_path):
    """What keeps two service replicas from forking the lineage: the second fusion onto a base
    that is no longer the newest fails whole, and its contribution still waits."""
    repo = Repository(tmp_path)
    base = repo.add_version(body(0.0), model_source="m")
    first = repo.add_contribution(body(1.0), base_version=base.id, contributor="a", task="t", num_examples=1)
    late = repo.add_contribution(body(3.0), base_version=base.id, contributor="b", task="t", num_examples=1)
    repo.fuse(base.id, [first.id], onto_newest=True)
    with pytest.raises(ColdFusionError, match="version 1 is no longer the newest"):
        repo.fuse(base.id, [late.id], onto_newest=True)
    assert [v.id for v in repo.versions()] == [1, 2] and repo.contributions()[1].waiting
    third = repo.fuse(2, [late.id], onto_newest=True)  # the next poll: onto the new base, rebased
    assert third.parent == 2 and torch.allclose(repo.load_version(3)["layer.bias"], torch.full((3,), 4.0))
    assert repo.verify().ok


def test_metrics_recorded_once_keep_the_first_row_per_version_task_protocol_and_run(tmp_path):
    repo = Repository(tmp_path)
    repo.add_version({"w": torch.zeros(2)}, model_source="m")
    assert repo.record_metrics(1, "t", "probe", {"accuracy": 0.5}, run="suite", once=True)
    assert not repo.record_metrics(1, "t", "probe", {"accuracy": 0.9}, run="suite", once=True)
    assert repo.record_metrics(1, "t", "probe", {"accuracy": 0.7}, run="other", once=True)
    assert repo.record_metrics(1, "t", "probe", {"accuracy": 0.6}, once=True)  # no run is a run of its own
    assert not repo.record_metrics(1, "t", "probe", {"accuracy": 0.1}, once=True)
    assert repo.record_metrics(1, "t", "probe", {"accuracy": 0.8}, run="suite")  # without once: always added
    assert [(m["run"], m["values"]["accuracy"]) for m in repo.metrics(1)] == [
        ("suite", 0.5), ("other", 0.7), (None, 0.6), ("suite", 0.8)]
