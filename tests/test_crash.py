"""Crash safety: SIGKILL at each failpoint, then nothing is damaged and --resume finishes the run exactly.

Each case runs the CLI in a subprocess with COLDFUSION_KILL_AT set (coldfusion/faults.py),
so the kill lands at a known moment: mid-training, mid-fusion, a checkpoint half
written, a file written but not indexed, an iteration stored but not recorded.
"""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from test_loop import final_body, tiny_config

from coldfusion.collab import run_cold_fusion
from coldfusion.collab.config import dump_config
from coldfusion.repository import Repository
from coldfusion.repository.validation import ValidationSettings


@pytest.fixture(scope="module")
def reference(tiny_model_dir, toy_task_files, tmp_path_factory):
    """The uninterrupted run every crashed-and-resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    return final_body(run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, root)))


def cli(*args, kill_at=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "COLDFUSION_KILL_AT"}
    if kill_at:
        env["COLDFUSION_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "coldfusion", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kill_at", [
    "training.step:15",         # iteration 2, second contributor (6 steps each per iteration)
    "fusion.tensor:30",         # in the middle of iteration 1's fusion
    "checkpoint.partial:6",     # some checkpoint (a contribution, a version, a head) half written
    "checkpoint.unrenamed:9",   # ... complete in its temporary file, not yet renamed
    "repository.unindexed:4",   # iteration 1's fused version stored, its index rows not committed
    "loop.unrecorded:2",        # iteration 2 stored and logged, state.json not yet updated
])
def test_kill_9_at_a_failpoint_then_resume(tiny_model_dir, toy_task_files, tmp_path, reference, kill_at):
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(tiny_config(tiny_model_dir, toy_task_files, tmp_path)))
    killed = cli("run", config, kill_at=kill_at)
    assert killed.returncode == -9, f"not killed at {kill_at}: {killed.stderr[-1500:]}"
    run_dir = tmp_path / "runs" / "tiny"
    report = Repository(run_dir / "repository").verify()
    assert report.ok, report.problems
    before = {c.sha256 for c in Repository(run_dir / "repository").contributions()}
    outside = cli("fuse", run_dir / "repository")  # the run's own contributions wait for the run
    assert outside.returncode == 2, outside.stderr
    assert "no contributions waiting" in outside.stderr or "has no versions yet" in outside.stderr, outside.stderr

    resumed = cli("run", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    body = final_body(run_dir)
    assert all(torch.equal(body[k], reference[k]) for k in reference)
    repo = Repository(run_dir / "repository")
    assert before <= {c.sha256 for c in repo.contributions()}  # nothing that was stored is lost
    # the interrupted iteration was redone, not reused: one live version per iteration, and
    # every contribution fused, refused or abandoned (none left for a later fusion to pick up)
    assert sorted(v.iteration for v in repo.versions() if not v.abandoned) == [0, 1, 2]
    assert not [c.id for c in repo.contributions() if c.waiting]
    live = {v.id for v in repo.versions() if not v.abandoned}
    assert all(c.fused_into in live for c in repo.contributions() if c.fused_into and not c.abandoned)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["iteration"] for r in rows if r["kind"] == "fusion") == [1, 2]
    checked = cli("verify", run_dir / "repository", "--clean", "--min-age", "0")  # nothing else writes now
    assert checked.returncode == 0 and "ok:" in checked.stdout, checked.stdout + checked.stderr
    assert not [p for p in repo.objects.iterdir() if p.name.startswith(".")]


def test_an_unknown_failpoint_is_an_error(tmp_path):
    result = cli("verify", tmp_path, kill_at="fusion.tenser")
    assert result.returncode != 0 and "COLDFUSION_KILL_AT=fusion.tenser: expected NAME or NAME:K" in result.stderr


def _add_many(root, base_id, worker, count):
    repo = Repository(root)
    for i in range(count):
        tensors = {"w": torch.full((64, 64), float(worker * 100 + i + 1)), "b": torch.zeros(64)}
        repo.add_contribution(tensors, base_version=base_id, contributor=f"w{worker}", task="t", num_examples=i + 1,
                              rules=ValidationSettings(outlier_factor=None))  # updates of every size, on purpose
        repo.record_metrics(base_id, f"w{worker}", "probe", {"i": i})


def test_concurrent_writers_do_not_corrupt_the_repository(tmp_path):
    repo = Repository(tmp_path)
    base = repo.add_version({"w": torch.zeros(64, 64), "b": torch.zeros(64)}, model_source="m")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_add_many, args=(tmp_path, base.id, w, 12)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    contributions = repo.contributions(base_version=base.id)
    assert len(contributions) == 36 and len({c.sha256 for c in contributions}) == 36
    assert len(repo.metrics(base.id)) == 36
    assert repo.verify().ok
    newest = [max(c.id for c in contributions if c.contributor == f"w{w}") for w in range(3)]
    fused = repo.fuse(base.id, newest)  # (each writer is one contributor: it counts once per fusion)
    expected = sum(w * 100 + 12 for w in range(3)) / 3
    assert torch.allclose(repo.load_version(fused.id)["w"], torch.full((64, 64), expected))
