"""Hostile input through the command line: every one is refused with exit 2 and a message
that says what was wrong, never a traceback, and nothing it touched is changed."""

import json
import pickle
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from coldfusion.cli import app
from coldfusion.repository import Repository

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def refused(result, *fragments):
    """Exit 2, no traceback, and every fragment in the message."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    squeezed = "".join(result.output.split())  # rich wraps lines, even inside words
    for fragment in fragments:
        assert "".join(fragment.split()) in squeezed, (fragment, result.text)


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(head) if length is None else length).to_bytes(8, "little") + head + data


GOOD_ENTRY = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
MALFORMED = {
    "header length 2^62": safetensors_bytes(GOOD_ENTRY, bytes(8), length=2**62),
    "header length 2^40": safetensors_bytes(GOOD_ENTRY, bytes(8), length=2**40),
    "header longer than the file": safetensors_bytes(GOOD_ENTRY, bytes(8), length=4096),
    "header is a JSON list": safetensors_bytes([1, 2, 3], bytes(8)),
    "header is not JSON": safetensors_bytes(b"{nope", bytes(8)),
    "entry is a string": safetensors_bytes({"w": "F32"}, bytes(8)),
    "unknown dtype": safetensors_bytes({"w": {**GOOD_ENTRY["w"], "dtype": "F8_E9"}}, bytes(8)),
    "negative shape": safetensors_bytes({"w": {**GOOD_ENTRY["w"], "shape": [-2]}}, bytes(8)),
    "offsets past the data": safetensors_bytes({"w": {**GOOD_ENTRY["w"], "data_offsets": [0, 800]}}, bytes(8)),
    "offsets that do not fit the shape": safetensors_bytes({"w": {**GOOD_ENTRY["w"], "shape": [3]}}, bytes(8)),
    "shorter than a length": b"\x01\x02",
}


@pytest.fixture
def repository(tmp_path):
    repo = Repository(tmp_path / "repo")
    repo.add_version({"w": torch.zeros(2)}, model_source="m")
    return repo


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_uploads_are_refused_by_contribute_and_merge(tmp_path, repository, case):
    upload = tmp_path / "upload.safetensors"
    upload.write_bytes(MALFORMED[case])
    result = invoke("contribute", repository.root, upload, "--base", 1, "--contributor", "x", "--task", "t",
                    "--examples", 1)
    refused(result, "upload.safetensors", "not a readable safetensors file")
    assert repository.contributions() == []

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    shutil.copy(upload, model / "model.safetensors")
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"models": [{"model": str(model)}], "output": str(tmp_path / "out")}))
    refused(invoke("merge", config), "model.safetensors", "not a readable safetensors file")
    assert not (tmp_path / "out").exists()


class Boom:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_malicious_pickle_is_refused_even_when_pickles_are_allowed(tmp_path, repository, capsys):
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"w": Boom()}))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    for path in (evil, garbage):
        result = invoke("contribute", repository.root, path, "--base", 1, "--contributor", "x", "--task", "t",
                        "--examples", 1, "--allow-pickle")
        refused(result, path.name, "refused: not a plain state dict that loads with weights_only")
    assert "this pickle ran code" not in result.output + capsys.readouterr().out
    assert repository.contributions() == []


def test_error_text_with_brackets_is_printed_as_written(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tasks: [bbc_topic\nname: [x]\n")  # a YAML syntax error quotes bracketed text
    result = invoke("run", config)
    refused(result, "not valid YAML", "[bbc_topic")
    weird = tmp_path / "[odd] dir"
    result = invoke("verify", weird)
    refused(result, "no repository at", "[odd] dir")


@pytest.mark.parametrize(("command", "config", "where"), [
    ("run", {"name": "../../escaped", "tasks": ["bbc_topic"]}, "'name'"),
    ("run", {"tasks": [{"name": "../../evil", "path": "t.csv"}]}, "'tasks.0.name'"),
    ("run", {"tasks": [{"name": ".hidden", "path": "t.csv"}]}, "'tasks.0.name'"),
    ("run", {"engine": "flower", "flower": {"mode": "deployment"}, "contributors": ["a/b"]}, "'contributors.0'"),
    ("evaluate", {"name": "../up", "bodies": [{"name": "b", "model": "default"}], "tasks": ["bbc_topic"]}, "'name'"),
    ("multitask", {"name": "/abs", "tasks": ["bbc_topic"]}, "'name'"),
])
def test_names_that_would_leave_their_directory_are_refused(tmp_path, monkeypatch, command, config, where):
    """A run, task or contributor name becomes a path component (runs/NAME, heads/RUN/NAME)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / "out" / "runs")}))
    refused(invoke(command, path), where, "cannot name a file or directory")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "out"]


def test_the_same_upload_twice_is_refused_as_a_duplicate(tmp_path, repository):
    upload = tmp_path / "body.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, upload)
    args = ("contribute", repository.root, upload, "--base", 1, "--contributor", "acme", "--task", "t",
            "--examples", 5)
    assert invoke(*args).exit_code == 0
    refused(invoke(*args), "refused (duplicate): the same payload")
    refused(invoke(*args[:3], "--base", "latest", *args[5:-1], 7), "as contribution 1, which it sent")
    assert len(repository.contributions()) == 1
    fused = invoke("fuse", repository.root)
    assert fused.exit_code == 0 and "version 2 = average of contributions [1]" in fused.text
    refused(invoke("fuse", repository.root, "--contributions", "1"), "contribution 1 was already fused into version 2")


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_failed_before_its_first_iteration_starts_over_with_the_corrected_config(
        tiny_model_dir, toy_task_files, tmp_path, resume):
    from test_loop import tiny_config

    from coldfusion.collab.config import dump_config

    config = tiny_config(tiny_model_dir, toy_task_files, tmp_path, iterations=1)
    path = tmp_path / "run.yaml"
    broken = yaml.safe_load(dump_config(config))
    broken["tasks"][1]["path"] = str(tmp_path / "missing.csv")
    path.write_text(yaml.safe_dump(broken))
    refused(invoke("run", path), "missing.csv", "does not exist")
    assert (tmp_path / "runs" / "tiny" / "config.yaml").exists()  # the failed attempt left its directory

    path.write_text(dump_config(config))  # corrected
    result = invoke("run", path, *(["--resume"] if resume else []))
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())
    assert saved["tasks"][1]["path"] == str(toy_task_files["topic"])
    repo = Repository(tmp_path / "runs" / "tiny" / "repository")
    assert [v.iteration for v in repo.versions() if not v.abandoned] == [0, 1]
