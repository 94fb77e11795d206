"""Evaluation protocols: few-shot draws, determinism, resumable tidy results, the report."""

import json

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from coldfusion.evaluation import EvalConfig, run_evaluation
from coldfusion.evaluation.config import FewShotSettings, load_eval_config
from coldfusion.evaluation.few_shot import few_shot, stratified_counts
from coldfusion.infra.errors import ColdFusionError
from coldfusion.tasks.task import Split


def test_few_shot_draws_exactly_k_per_class_deterministically():
    labels = [0] * 50 + [1] * 30 + [2] * 5
    split = Split(texts=[f"t{i}" for i in range(len(labels))], labels=labels)
    a = few_shot(split, 10, seed=1)
    assert np.bincount(a.labels).tolist() == [10, 10, 5]  # a class with fewer gives all it has
    assert few_shot(split, 10, seed=1) == a  # same seed, same examples, same order
    b = few_shot(split, 10, seed=2)
    assert set(b.texts) != set(a.texts) and np.bincount(b.labels).tolist() == [10, 10, 5]
    assert all(split.labels[int(t[1:])] == y for t, y in zip(a.texts, a.labels, strict=True))
    assert len(set(a.texts)) == 25  # no repeats


def test_few_shot_per_task_is_stratified_by_class():
    labels = [0] * 50 + [1] * 30 + [2] * 5 + [3] * 1
    split = Split(texts=[f"t{i}" for i in range(len(labels))], labels=labels)
    # 20 of 86: one per class, the other 16 in proportion: shares 10.30, 6.58, 1.93, 1.19;
    # floors 10, 6, 1, 1 and the two largest remainders (1.93, 6.58) get one more
    a = few_shot(split, 20, seed=1, per="task")
    assert np.bincount(a.labels).tolist() == [10, 7, 2, 1]
    assert few_shot(split, 20, seed=1, per="task") == a and len(set(a.texts)) == 20
    assert sum(few_shot(split, 200, seed=1, per="task").labels) == sum(labels)  # k above the split: all of it


@given(st.lists(st.integers(1, 400), min_size=1, max_size=30), st.integers(1, 300))
def test_stratified_counts_sum_to_k_respect_sizes_and_proportions(sizes, k):
    counts = stratified_counts(sizes, k)
    assert sum(counts) == min(k, sum(sizes)) and all(0 <= c <= s for c, s in zip(counts, sizes, strict=True))
    if k >= len(sizes) and k <= sum(sizes):
        assert all(c >= 1 for c in counts)
    if len(sizes) <= k <= sum(sizes) and all(s >= k for s in sizes):  # no class capped: within one of its share
        for c, s in zip(counts, sizes, strict=True):
            assert abs(c - (1 + (k - len(sizes)) * s / sum(sizes))) < 1


def test_few_shot_per_is_checked():
    with pytest.raises(ValueError, match="'class' or 'task'"):
        FewShotSettings(per="dataset")


def eval_config(tiny_model_dir, toy_task_files, tmp_path, **overrides) -> EvalConfig:
    return EvalConfig.model_validate({
        "name": "tiny-eval", "threads": 1, "max_length": 32, "seeds": [0, 1],
        "bodies": [{"name": "pretrained", "model": str(tiny_model_dir)}],
        "tasks": [{"name": n, "path": str(p)} for n, p in toy_task_files.items()],
        "protocols": ["linear_probe", "few_shot", "finetune"],
        "probe": {"l2_grid": [1e-3], "max_iter": 30},
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "head_lr": 5e-3},
        "few_shot": {"k": 8, "finetune": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "head_lr": 5e-3}},
        "train_examples": 64, "validation_examples": 32, "test_examples": 48,
        "output_dir": str(tmp_path / "runs"), **overrides,
    })


def test_evaluation_is_deterministic_and_resumable(tiny_model_dir, toy_task_files, tmp_path):
    cfg = eval_config(tiny_model_dir, toy_task_files, tmp_path)
    run_dir = run_evaluation(cfg)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    # tasks x (2 seeds of finetune and few-shot + 1 of the deterministic linear probe)
    assert len(rows) == len(toy_task_files) * (2 + 2 + 1)
    assert {r["protocol"] for r in rows} == {"linear_probe", "few_shot", "finetune"}
    assert all(len(r["test_correct"]) == r["n_test"] == 48 for r in rows)
    from coldfusion.infra.runtime import precision_name, resolve_compute

    here = resolve_compute(cfg.device, cfg.precision, cfg.threads)  # each row says where it was measured
    assert {(r["device"], r["precision"]) for r in rows} == {(str(here.device), precision_name(here.dtype))}
    few = [r for r in rows if r["protocol"] == "few_shot"]
    assert all(r["train_examples"] <= 8 * 3 for r in few)
    # the same body and seed evaluated again (elsewhere) gives identical numbers
    again = run_evaluation(cfg, run_dir=tmp_path / "again")
    rows_again = [json.loads(line) for line in (again / "results.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in rows_again]
    # resuming: a finished evaluation measures nothing twice; a lost row is measured again
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    (run_dir / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    run_evaluation(cfg, run_dir=run_dir)
    resumed = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, map(strip, resumed))) == sorted(map(json.dumps, map(strip, rows)))
    # ... but not with other settings: the rows would not be comparable
    changed = eval_config(tiny_model_dir, toy_task_files, tmp_path, test_examples=40)
    with pytest.raises(ColdFusionError, match=r"other settings of \['test_examples'\]"):
        run_evaluation(changed, run_dir=run_dir)
    # a setting added since the rows were measured counts as its default
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["held_out"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    run_evaluation(cfg, run_dir=run_dir)


def test_report_compares_bodies_with_paired_intervals(tiny_model_dir, toy_task_files, tmp_path):
    """A repository version as a second body: the report has its gain over the reference."""
    from coldfusion.models.encoder import Encoder
    from coldfusion.repository import Repository

    encoder = Encoder.load(str(tiny_model_dir))
    repo = Repository(tmp_path / "repo")
    torch.manual_seed(0)
    noisy = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in encoder.pretrained.items()}
    repo.add_version(noisy, model_source=str(tiny_model_dir))
    cfg = eval_config(tiny_model_dir, toy_task_files, tmp_path, protocols=["linear_probe"],
                      bodies=[{"name": "pretrained", "model": str(tiny_model_dir)},
                              {"name": "noisy", "repository": str(tmp_path / "repo"), "version": "v1"}])
    run_dir = run_evaluation(cfg)
    summary = (run_dir / "summary.md").read_text()
    assert "## linear_probe" in summary and "| task | pretrained | noisy |" in summary
    assert "gain over pretrained [95% CI]" in summary and "tasks better than pretrained" in summary
    for task in toy_task_files:
        assert f"| {task} |" in summary
    # a later run into the same directory with only another body: the report and config.yaml
    # still cover the earlier bodies' rows, and gains stay measured against the first reference
    later = eval_config(tiny_model_dir, toy_task_files, tmp_path, protocols=["linear_probe"],
                        bodies=[{"name": "noisy_again", "repository": str(tmp_path / "repo"), "version": "v1"}])
    run_evaluation(later, run_dir=run_dir)
    summary = (run_dir / "summary.md").read_text()
    assert "| task | pretrained | noisy | noisy_again |" in summary and "gain over pretrained" in summary
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [b["name"] for b in saved["bodies"]] == ["pretrained", "noisy", "noisy_again"]


def test_eval_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bodies: [{name: a, model: default, repository: r}]\ntasks: [bbc_topic]\n")
    with pytest.raises(ColdFusionError, match="give exactly one of `model` or `repository`"):
        load_eval_config(bad)
    bad.write_text("bodies: [{name: a, model: default}]\ntasks: [bbc_topic]\nprotocols: [zero_shot]\n")
    with pytest.raises(ColdFusionError, match=r"'protocols.0': Input should be 'linear_probe', 'finetune' or"):
        load_eval_config(bad)
    bad.write_text("bodies: [{name: a, model: default}]\ntasks: [bbc_topic]\nreference: b\n")
    with pytest.raises(ColdFusionError, match="reference 'b' is not one of the bodies"):
        load_eval_config(bad)


def test_tuning_scores_on_validation_and_never_touches_test(tiny_model_dir, toy_task_files, tmp_path):
    """held_out: validation scores the validation split; early stopping uses the end of train."""
    from coldfusion.tasks import TaskSpec, load_task

    name, path = next(iter(toy_task_files.items()))
    task = load_task(TaskSpec(name=name, path=str(path)))
    tuning = task.for_tuning(10)
    assert tuning.test == task.validation
    assert tuning.validation == task.train.take(range(len(task.train) - 10, len(task.train)))
    assert set(tuning.train.texts).isdisjoint(tuning.validation.texts)
    assert len(tuning.train) + len(tuning.validation) == len(task.train)
    assert not set(task.test.texts) & (set(tuning.train.texts) | set(tuning.validation.texts) | set(tuning.test.texts))

    cfg = eval_config(tiny_model_dir, toy_task_files, tmp_path, name="tune", held_out="validation",
                      protocols=["linear_probe"], test_examples=None)
    run_dir = run_evaluation(cfg)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    by_task = {r["task"]: r for r in rows}
    assert by_task[name]["n_test"] == len(task.validation)
    assert "validation split (a tuning run" in (run_dir / "summary.md").read_text()
