"""The multitask baseline: every sampler trains; its body lands in a repository."""

import json

import pytest

from coldfusion.infra.errors import ColdFusionError
from coldfusion.multitask.config import MultitaskConfig, load_multitask_config
from coldfusion.multitask.run import run_multitask
from coldfusion.repository import Repository


def mt_config(tiny_model_dir, toy_task_files, tmp_path, sampler, **params) -> MultitaskConfig:
    return MultitaskConfig.model_validate({
        "name": f"mt-{sampler}", "model": str(tiny_model_dir), "threads": 1, "max_length": 32,
        "tasks": [{"name": n, "path": str(p)} for n, p in toy_task_files.items()],
        "validation_examples": 32,
        "multitask": {"sampler": sampler, "sampler_params": params, "steps": 12, "heldout_per_task": 4,
                      "optimizer": {"batch_size": 8, "lr": 1e-3, "head_lr": 5e-3}},
        "output_dir": str(tmp_path / "runs"),
    })


@pytest.mark.parametrize(("sampler", "params"), [("proportional", {}), ("uniform", {}),
                                                 ("temperature", {"temperature": 3.0}),
                                                 ("uncertainty", {}), ("mometas", {"every": 4})])
def test_every_sampler_trains_and_stores_a_body(tiny_model_dir, toy_task_files, tmp_path, sampler, params):
    cfg = mt_config(tiny_model_dir, toy_task_files, tmp_path, sampler, **params)
    run_dir = run_multitask(cfg)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    summary = rows[-1]
    assert len(steps) == 12 and summary["kind"] == "summary"
    assert summary["examples_seen"] == 12 * 8 == sum(summary["examples_per_task"].values())
    if sampler == "uncertainty":  # a batch of the most uncertain candidates, from any task
        assert all(sum(r["examples"].values()) == 8 for r in steps)
    else:
        assert all(len(r["examples"]) == 1 for r in steps)
    if sampler == "mometas":  # the logits learn every 4 steps from the held-out losses
        learned = [r for r in steps if "reward" in r]
        assert [r["step"] for r in learned] == [4, 8, 12]
        assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in learned)
        assert learned[-1]["probabilities"] != dict.fromkeys(learned[-1]["probabilities"], 1 / 3)
    repo = Repository(run_dir / "repository")
    version = repo.version(summary["version"])
    assert version.fusion["method"] == "multitask" and version.fusion["sampler"] == sampler
    assert repo.load(version.sha256)  # a body like any other base
    with pytest.raises(ColdFusionError, match="already holds a finished multitask run"):
        run_multitask(cfg)


def test_multitask_is_deterministic(tiny_model_dir, toy_task_files, tmp_path):
    a = run_multitask(mt_config(tiny_model_dir, toy_task_files, tmp_path, "temperature"), run_dir=tmp_path / "a")
    b = run_multitask(mt_config(tiny_model_dir, toy_task_files, tmp_path, "temperature"), run_dir=tmp_path / "b")
    sha = lambda d: json.loads((d / "results.jsonl").read_text().splitlines()[-1])["sha256"]  # noqa: E731
    assert sha(a) == sha(b)


def test_multitask_config_errors(tmp_path):
    bad = tmp_path / "mt.yaml"
    bad.write_text("tasks: [bbc_topic]\nmultitask: {sampler: temperature, sampler_params: {temp: 2}}\n")
    with pytest.raises(ColdFusionError, match="'multitask': sampler 'temperature'"):
        load_multitask_config(bad)
    bad.write_text("tasks: [bbc_topic]\nmultitask: {sampler: random}\n")
    with pytest.raises(ColdFusionError, match="'multitask.sampler': Input should be"):
        load_multitask_config(bad)
