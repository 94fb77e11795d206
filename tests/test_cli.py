"""End to end through the `coldfusion` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel
from typer.testing import CliRunner

from coldfusion.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_real_minilm_two_real_tasks(tmp_path):
    """The bundled MiniLM, two built-in corpora, small sizes: run, resume, list, export."""
    config = {
        "name": "e2e", "model": "default", "max_length": 48,
        "tasks": ["election_tweets", "bbc_topic"],
        "loop": {"iterations": 1, "examples_per_contributor": 64, "validation_examples": 32},
        "finetune": {"batch_size": 16},
        "evaluation": {"train_examples": 96, "validation_examples": 48, "test_examples": 96},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    assert "Result:" in result.output and "election_tweets" in result.output
    # Extend the finished run by one iteration with --resume.
    config["loop"]["iterations"] = 2
    path.write_text(yaml.safe_dump(config))
    result = invoke("run", path, "--resume")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "e2e"
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    probes = {(r["task"], r["iteration"]): r["accuracy"] for r in rows if r["kind"] == "probe"}
    assert set(probes) == {(t, i) for t in ("election_tweets", "bbc_topic") for i in (0, 1, 2)}
    assert probes[("bbc_topic", 0)] > 0.6  # the real MiniLM is a real encoder: BBC topics are easy for it
    assert "it 2" in (run_dir / "summary.md").read_text()

    repo = run_dir / "repository"
    result = invoke("versions", repo)
    assert result.exit_code == 0 and "average" in result.output
    result = invoke("export", repo, "3", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    exported = AutoModel.from_pretrained(tmp_path / "hf")
    from coldfusion.repository import Repository

    fused = Repository(repo).load_version(3)
    state = exported.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fused.items())


def test_bad_config_is_a_clean_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [bbc_topic]\nloop: {iterations: zero}\n")
    result = invoke("run", path)
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "'loop.iterations'" in result.output
    assert "Traceback" not in result.output


def test_unknown_task_through_the_cli(tmp_path, tiny_model_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["imdb"], "model": str(tiny_model_dir),
                                    "output_dir": str(tmp_path / "runs")}))
    result = invoke("run", path)
    assert result.exit_code == 2 and "unknown task 'imdb'" in result.output and "bbc_topic" in result.output


EXE = Path(sys.executable).parent / "coldfusion"  # the console script, installed beside the interpreter


def console(*args, columns: int = 80, timeout: int = 300):
    """The installed command, as a user runs it in a terminal of that many columns."""
    assert EXE.exists(), "the console script `coldfusion` is not installed"
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={"COLUMNS": str(columns), "PATH": ""})


@pytest.mark.parametrize("columns", [80, 200])
def test_console_script_lists_the_whole_catalog_at_any_width(columns):
    from coldfusion.tasks import CATALOG

    out = console("tasks", columns=columns)
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= columns
    squeezed = "".join(out.stdout.split())
    for name, entry in CATALOG.items():  # no name cut, no column dropped
        assert f" {name} " in out.stdout and entry.package.split()[0] in squeezed, name  # "(Debian)" may wrap
    for text in ("26070", "train", "val", "test", "52labels", "interest"):
        assert text in squeezed


def test_versions_keep_every_column_in_80_columns(tmp_path):
    from coldfusion.repository import Repository

    repo = Repository(tmp_path / "a-rather-long-repository-name")
    base = repo.add_version({"w": torch.zeros(2)}, model_source="m")
    ids = [repo.add_contribution({"w": torch.full((2,), 0.01 * (i + 1))}, base_version=base.id,
                                 contributor=f"c{i}", task="t", num_examples=1).id for i in range(12)]
    v = repo.fuse(base.id, ids)
    out = console("versions", repo.root)
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    squeezed = "".join(out.stdout.split())
    for text in ("iter", "method", "fused", "refused", "sha256", "acc", v.sha256[:12]):
        assert text in squeezed, text
    import re

    assert set(map(int, re.findall(r"\b\d+\b", out.stdout))) >= set(ids)  # every id, however the cell wraps


def test_version_and_short_help():
    from coldfusion import __version__

    assert console("--version").stdout.strip() == f"coldfusion {__version__}"
    for args in (["-h"], ["run", "-h"], ["flower", "-h"]):
        out = console(*args)
        assert out.returncode == 0 and "Usage: coldfusion" in out.stdout, args


@pytest.mark.parametrize(("command", "text", "key"), [
    ("run", "tasks: [bbc_topic]\nloop: {iterations: 0}\n", "'loop.iterations'"),
    ("evaluate", "bodies: []\ntasks: [bbc_topic]\n", "'bodies'"),
    ("multitask", "tasks: []\n", "'tasks'"),
])
def test_a_config_error_is_reported_before_the_heavy_imports(tmp_path, command, text, key):
    """Checking a config must not wait for torch and transformers to load."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = (f"import sys, coldfusion.cli as c; sys.argv = ['coldfusion', '{command}', sys.argv[1]]\n"
            "try:\n    c.app()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules, "
            "'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr
    assert key in out.stderr


@pytest.mark.parametrize(("model", "sampler", "says"), [("shared", "uniform", "uniform sampler, 6 steps"),
                                                       ("ca_mtl", "uncertainty", "CA-MTL, uncertainty sampler")])
def test_multitask_then_evaluate_through_the_cli(tmp_path, tiny_model_dir, toy_task_files, model, sampler, says):
    """`coldfusion multitask` stores a body (plain or CA-MTL's); `coldfusion evaluate` compares
    it with the pretrained one."""
    tasks = [{"name": n, "path": str(p)} for n, p in toy_task_files.items()]
    mt = {"name": "mt", "model": str(tiny_model_dir), "threads": 1, "max_length": 32, "tasks": tasks,
          "validation_examples": 16, "output_dir": str(tmp_path / "runs"),
          "multitask": {"model": model, "sampler": sampler, "steps": 6,
                        "optimizer": {"batch_size": 8, "lr": 1e-3}}}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(mt))
    result = invoke("multitask", tmp_path / "mt.yaml")
    assert result.exit_code == 0, result.output
    assert says in " ".join(result.output.split())
    ev = {"name": "ev", "threads": 1, "max_length": 32, "seeds": [0, 1], "tasks": tasks,
          "bodies": [{"name": "pretrained", "model": str(tiny_model_dir)},
                     {"name": "multitask", "repository": str(tmp_path / "runs" / "mt" / "repository")}],
          "protocols": ["few_shot"], "few_shot": {"k": 4, "finetune": {"epochs": 1, "batch_size": 4}},
          "test_examples": 32, "output_dir": str(tmp_path / "runs")}
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(ev))
    result = invoke("evaluate", tmp_path / "ev.yaml")
    assert result.exit_code == 0, result.output
    assert "gain over pretrained" in result.output
    rows = [json.loads(x) for x in (tmp_path / "runs" / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(tasks) * 2  # bodies x tasks x seeds
    # a missing repository is a clean error, not a traceback
    ev["bodies"][1]["repository"] = str(tmp_path / "nowhere")
    ev["name"] = "ev2"
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(ev))
    result = invoke("evaluate", tmp_path / "ev.yaml")
    assert result.exit_code == 2 and "is not a coldfusion repository" in " ".join(result.output.split())
    assert not (tmp_path / "runs" / "ev2").exists()  # nothing written for a config that cannot run


def test_ctrl_c_says_the_run_can_be_resumed_and_how(tiny_model_dir, toy_task_files, tmp_path):
    import os
    import signal
    import time

    from test_loop import tiny_config

    from coldfusion.collab.config import dump_config

    path = tmp_path / "run.yaml"
    path.write_text(dump_config(tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=40)))
    # as from a terminal: a shell running this suite in the background would pass SIGINT on ignored
    interactive = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    run = subprocess.Popen([sys.executable, "-m", "coldfusion", "run", str(path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=interactive)
    try:
        state = tmp_path / "runs" / "tiny" / "state.json"
        deadline = time.monotonic() + 300
        while not state.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.stderr.read()
        os.kill(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, err[-2000:]
    assert "interrupted:" in err and f"continue with: coldfusion run {path} --resume" in " ".join(err.split())
    assert "Traceback" not in err
    path.write_text(dump_config(tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=1)))
    assert invoke("run", path, "--resume").exit_code == 0
