"""The ColD Fusion loop end to end with a tiny random encoder and toy csv tasks."""

import json

import pytest
import torch

from coldfusion.collab import run_cold_fusion
from coldfusion.collab.config import parse_config
from coldfusion.infra.errors import ColdFusionError
from coldfusion.repository import Repository


def tiny_config(tiny_model_dir, toy_task_files, tmp_path, **loop):
    return parse_config({
        "name": "tiny", "model": str(tiny_model_dir), "max_length": 32, "threads": 1,
        "tasks": [{"name": n, "path": str(p)} for n, p in toy_task_files.items()],
        "loop": {"iterations": 2, "examples_per_contributor": 96, "validation_examples": 40, **loop},
        "finetune": {"batch_size": 16, "lr": 1e-3, "head_lr": 5e-3},
        "evaluation": {"train_examples": 120, "validation_examples": 40, "test_examples": 60,
                       "probe": {"l2_grid": [1e-3], "max_iter": 50}},
        "output_dir": str(tmp_path / "runs"),
    })


def final_body(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    return Repository(run_dir / "repository").load_version(state["version"])


def test_loop_writes_the_run_directory(tiny_model_dir, toy_task_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path)
    run_dir = run_cold_fusion(cfg)
    for f in ("config.yaml", "results.jsonl", "summary.md", "report.html", "plots/accuracy.png", "state.json"):
        assert (run_dir / f).exists(), f
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    probes = [r for r in rows if r["kind"] == "probe"]
    assert {(r["task"], r["iteration"]) for r in probes} == {(t, i) for t in toy_task_files for i in (0, 1, 2)}
    assert sum(r["kind"] == "contribution" for r in rows) == 4  # 2 contributors x 2 iterations
    summary = (run_dir / "summary.md").read_text()
    assert "| sentiment |" in summary and "| **mean** |" in summary and "pretrained" in summary

    repo = Repository(run_dir / "repository")
    versions = repo.versions()
    assert [v.parent for v in versions] == [None, 1, 2]
    # The fused body is exactly the average of the contributions that made it.
    last = versions[-1]
    contribs = repo.contributions(fused_into=last.id)
    assert {c.task for c in contribs} == set(toy_task_files) and all(c.base_version == 2 for c in contribs)
    parts = [repo.load(c.sha256) for c in contribs]
    fused = repo.load(last.sha256)
    for k in fused:
        if fused[k].is_floating_point():
            assert torch.allclose(fused[k], (parts[0][k] + parts[1][k]) / 2, atol=1e-6)
    # ... and it moved away from the pretrained body.
    first = repo.load(versions[0].sha256)
    assert any(not torch.equal(first[k], fused[k]) for k in fused)


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(tiny_model_dir, toy_task_files, tmp_path):
    full = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "a"))
    # Interrupted after iteration 1: run 1 iteration, then resume the same directory with 2.
    cfg1 = tiny_config(tiny_model_dir, toy_task_files, tmp_path / "b", iterations=1)
    part = run_cold_fusion(cfg1)
    with open(part / "results.jsonl", "a") as f:  # a half-finished iteration 2 left a row behind
        f.write(json.dumps({"kind": "probe", "iteration": 2, "task": "zombie", "accuracy": 0}) + "\n")
    resumed = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "b"), resume=True)
    a, b = final_body(full), final_body(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (resumed / "results.jsonl").read_text().splitlines()]
    assert not any(r.get("task") == "zombie" for r in rows)
    assert sum(r["kind"] == "fusion" for r in rows) == 2


def test_run_directory_is_never_overwritten(tiny_model_dir, toy_task_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=1)
    run_cold_fusion(cfg)
    with pytest.raises(ColdFusionError, match="already exists; resume it with --resume"):
        run_cold_fusion(cfg)
    with pytest.raises(ColdFusionError, match="nothing to resume"):
        run_cold_fusion(cfg, run_dir=tmp_path / "empty", resume=True)
    # A run that died before finishing iteration 0 has a config but no state: it starts over.
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / "config.yaml").write_text((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    (tmp_path / "dead" / "results.jsonl").write_text('{"kind": "probe", "iteration": 0, "task": "zombie"}\n')
    run_cold_fusion(cfg, run_dir=tmp_path / "dead", resume=True)
    assert "zombie" not in (tmp_path / "dead" / "results.jsonl").read_text()
    assert json.loads((tmp_path / "dead" / "state.json").read_text())["completed_iterations"] == 1
    changed = cfg.model_copy(deep=True)
    changed.finetune.lr = 1.0
    with pytest.raises(ColdFusionError, match=r"config differs .* in \['finetune.lr'\]"):
        run_cold_fusion(changed, resume=True)


def test_sampled_contributors_and_weighted_fusion(tiny_model_dir, toy_task_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path, contributors_per_iteration=1, keep_head=False)
    cfg.fusion.method = "weighted"
    run_dir = run_cold_fusion(cfg)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    assert [len(r["contributors"]) for r in fusions] == [1, 1] and fusions[0]["method"] == "weighted"


def test_kill_9_mid_iteration_then_resume(tiny_model_dir, toy_task_files, tmp_path):
    """A real crash: SIGKILL the CLI while iteration 2 trains, resume, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from coldfusion.collab.config import dump_config

    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path / "killed", iterations=3)
    path = tmp_path / "killed.yaml"
    path.write_text(dump_config(cfg))
    state = tmp_path / "killed" / "runs" / "tiny" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "coldfusion", "run", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["completed_iterations"] >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["completed_iterations"] < 3

    resumed = subprocess.run([sys.executable, "-m", "coldfusion", "run", str(path), "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "clean", iterations=3))
    a, b = final_body(reference), final_body(state.parent)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (state.parent / "results.jsonl").read_text().splitlines()]
    assert sorted(r["iteration"] for r in rows if r["kind"] == "fusion") == [1, 2, 3]
    assert yaml.safe_load((state.parent / "config.yaml").read_text())["loop"]["iterations"] == 3


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}), ("median", {}),
                                            ("dare", {"density": 0.7, "variant": "ties"})])
def test_loop_with_other_operators(tiny_model_dir, toy_task_files, tmp_path, method, params):
    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=1)
    cfg.fusion.method, cfg.fusion.params = method, params
    run_dir = run_cold_fusion(cfg)
    repo = Repository(run_dir / "repository")
    version = repo.versions()[-1]
    assert version.fusion["method"] == method and version.fusion["params"] == params
    if method == "ties":  # the fused body is the TIES merge of the contributions onto their base
        from coldfusion.fusion import fuse_files

        expected = fuse_files([repo.path_of(c.sha256) for c in repo.contributions(fused_into=version.id)],
                              method, base=repo.path_of(repo.version(version.parent).sha256), **params)
        got = repo.load(version.sha256)
        assert all(torch.equal(expected[k], got[k]) for k in got)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_loop_with_contributor_statistics(tiny_model_dir, toy_task_files, tmp_path, method):
    """Contributors compute Fisher / Gram statistics on their own data; the repository fuses with them."""
    from coldfusion.fusion import fuse_files

    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=1)
    cfg.fusion.method = method
    cfg.fusion.statistics_examples = 32
    run_dir = run_cold_fusion(cfg)
    repo = Repository(run_dir / "repository")
    version = repo.versions()[-1]
    contribs = repo.contributions(fused_into=version.id)
    kind = "fisher" if method == "fisher" else "gram"
    assert len(contribs) == 2 and all(kind in c.stats for c in contribs)
    stats = [repo.load(c.stats[kind]) for c in contribs]
    bodies = [repo.load(c.sha256) for c in contribs]
    if kind == "fisher":  # one non-negative entry per body tensor, not all zero
        assert set(stats[0]) == {k for k, v in bodies[0].items() if v.is_floating_point()}
        assert all(float(v.min()) >= 0 for v in stats[0].values())
        assert any(float(v.sum()) > 0 for v in stats[0].values())
    else:  # one symmetric PSD Gram matrix per linear layer, sized by its input
        assert "encoder.layer.0.attention.self.query.weight" in stats[0]
        for name, g in stats[0].items():
            assert g.shape == (bodies[0][name].shape[1],) * 2 and torch.allclose(g, g.T, atol=1e-3)
            assert float(torch.linalg.eigvalsh(g.double()).min()) > -1e-3 * float(g.diagonal().max())
    fused = repo.load(version.sha256)
    average = fuse_files([repo.path_of(c.sha256) for c in contribs], "average")
    # the statistics change the result: it is not the plain average
    assert any(not torch.allclose(fused[k], average[k], atol=1e-6) for k in fused if fused[k].is_floating_point())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows if r["kind"] == "probe" and r["iteration"] == 1} == set(toy_task_files)


def test_fusion_without_the_needed_statistics_is_refused(tmp_path):
    repo = Repository(tmp_path)
    base = repo.add_version({"w": torch.zeros(2)}, model_source="m")
    c = repo.add_contribution({"w": torch.ones(2)}, base_version=base.id, contributor="a", task="t", num_examples=1)
    with pytest.raises(ColdFusionError, match=r"needs gram statistics, which contributions \[1\] did not send"):
        repo.fuse(base.id, [c.id], method="regmean")


def test_the_servers_own_suite_is_scored_beside_the_contributors_tasks(tiny_model_dir, toy_task_files, tmp_path):
    """`evaluation.suite`: tasks the repository owner holds, scored on the server; they are
    reported beside (not as) the contributors' scores, and no contributor trains on them."""
    from coldfusion.collab.config import RunConfig

    data = tiny_config(tiny_model_dir, {"sentiment": toy_task_files["sentiment"]}, tmp_path, iterations=1).model_dump()
    data["evaluation"]["suite"] = [{"name": "public_topic", "path": str(toy_task_files["topic"])}]
    run_dir = run_cold_fusion(RunConfig.model_validate(data))
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    scored = {(r["task"], r["iteration"], r["scored_by"]) for r in rows if r["kind"] == "probe"}
    assert scored == {(t, i, by) for t, by in (("sentiment", "contributor"), ("public_topic", "server"))
                      for i in (0, 1)}
    assert [r["contributors"] for r in rows if r["kind"] == "fusion"] == [["sentiment"]]
    assert "| public_topic (server) |" in (run_dir / "summary.md").read_text()
    data["evaluation"]["suite"] = [{"name": "sentiment", "path": str(toy_task_files["topic"])}]
    with pytest.raises(ValueError, match=r"unique across contributors and evaluation.suite: \['sentiment'\]"):
        RunConfig.model_validate(data)


def test_the_base_is_scored_every_n_iterations_and_after_the_last(tiny_model_dir, toy_task_files, tmp_path):
    cfg = tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=3)
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"every": 2})})
    run_dir = run_cold_fusion(cfg)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted({r["iteration"] for r in rows if r["kind"] == "probe"}) == [0, 2, 3]
    assert sorted(r["iteration"] for r in rows if r["kind"] == "fusion") == [1, 2, 3]
    assert "| **mean** |" in (run_dir / "summary.md").read_text()
