"""ColD Fusion on Flower: the same loop, with contributors as Flower ClientApps."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import make_sentiment_rows
from test_loop import final_body, tiny_config
from typer.testing import CliRunner

flwr = pytest.importorskip("flwr")

from coldfusion.cli import app  # noqa: E402
from coldfusion.collab import run_cold_fusion  # noqa: E402
from coldfusion.collab.contributor import ContributionResult  # noqa: E402
from coldfusion.collab.flower import deployment  # noqa: E402
from coldfusion.collab.flower.deployment import LocalFederation, write_app  # noqa: E402
from coldfusion.collab.flower.messages import (  # noqa: E402
    contribution_content,
    from_record,
    read_settings,
    settings_record,
    to_record,
)
from coldfusion.collab.flower.security import make_certificates  # noqa: E402
from coldfusion.collab.flower.strategy import ColdFusionStrategy  # noqa: E402
from coldfusion.config import FlowerSettings, FusionSettings, dump_config, parse_config  # noqa: E402
from coldfusion.encodings import EncodingSettings  # noqa: E402
from coldfusion.repository import Repository  # noqa: E402


def test_strategy_fuses_the_replies_with_our_operators_and_reports_failures(monkeypatch):
    """aggregate_train = `weighted` over the bodies (by example counts) that pass validation;
    an error reply is a failure, a body with NaNs is refused."""
    from flwr.app import Error, Message
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, value)
    strategy = ColdFusionStrategy("weighted", min_contributors=2)
    strategy.targets = [11, 12, 13, 14]
    base = {"w": torch.zeros(3), "ids": torch.arange(3)}
    sent = list(strategy.configure_train(4, to_record(base), settings_record(parse_config({"tasks": ["x"]})), None))
    assert [m.metadata.dst_node_id for m in sent] == [11, 12, 13, 14]
    assert read_settings(sent[0].content.config_records["config"])[1] == 4  # the round travels as server-round
    bodies = [{"w": torch.tensor([1.0, -2.0, 4.0]), "ids": torch.arange(3)},
              {"w": torch.tensor([4.0, 1.0, -2.0]), "ids": torch.arange(3)}]
    replies = [Message(contribution_content(ContributionResult(f"c{i}", f"c{i}", body, 10 * (i + 1))), reply_to=m)
               for i, (m, body) in enumerate(zip(sent, bodies, strict=False))]
    replies.append(Message(Error(code=5, reason="node went away"), reply_to=sent[2]))
    broken = {"w": torch.tensor([1.0, float("nan"), 0.0]), "ids": torch.arange(3)}
    replies.append(Message(contribution_content(ContributionResult("c3", "c3", broken, 99)), reply_to=sent[3]))
    results, failures = strategy.contributions(replies)
    assert sorted(results) == [11, 12, 14] and failures == {13: "node went away"}
    arrays, metrics = strategy.aggregate_train(4, replies)
    fused = from_record(arrays)
    assert torch.allclose(fused["w"], torch.tensor([3.0, 0.0, 0.0]))  # (10 a + 20 b) / 30; c3 refused
    assert torch.equal(fused["ids"], torch.arange(3))
    assert metrics["contributors"] == 2 and metrics["refused"] == 1 and metrics["num-examples"] == 30
    strategy.min_contributors = 4
    assert strategy.aggregate_train(4, replies) == (None, None)


@pytest.fixture(scope="module")
def three_tasks(toy_task_files, tmp_path_factory):
    """The two toy tasks plus a third contributor (sentiment in other words)."""
    root = tmp_path_factory.mktemp("third-task")
    pd.DataFrame(make_sentiment_rows(300, seed=3, words_pos=["bright", "warm", "sweet"],
                                     words_neg=["grim", "cold", "sour"])).to_csv(root / "mood.csv", index=False)
    return {**toy_task_files, "mood": root / "mood.csv"}


def test_simulation_fuses_what_the_local_engine_fuses(tiny_model_dir, three_tasks, tmp_path):
    """`coldfusion run` with engine: flower runs Flower's simulation runtime. RegMean over
    sparse contributions: the contributors' Gram matrices travel with their encoded bodies."""
    regmean = {"fusion": FusionSettings(method="regmean"),
               "contribution": EncodingSettings(kind="sparse", density=0.5, dtype="float32")}
    local = run_cold_fusion(tiny_config(tiny_model_dir, three_tasks, tmp_path / "local").model_copy(update=regmean))
    config = tiny_config(tiny_model_dir, three_tasks, tmp_path / "flower").model_copy(
        update={"engine": "flower", **regmean})
    (tmp_path / "run.yaml").write_text(dump_config(config))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    flower = config.output_dir / config.name
    a, b = final_body(local), final_body(flower)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    rows = [json.loads(line) for line in (flower / "results.jsonl").read_text().splitlines()]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    assert [f["contributors"] for f in fusions] == [list(three_tasks)] * 2 and all(not f["missing"] for f in fusions)
    assert all(f["method"] == "regmean" and f["encoding"] == "sparse" for f in fusions)
    assert {c.encoding["kind"] for c in Repository(flower / "repository").contributions()} == {"sparse"}


def test_deployment_configs_get_the_flower_app_not_a_silent_local_run(tiny_model_dir, three_tasks, tmp_path):
    app_dir, _ = _deployment(tiny_model_dir, three_tasks, tmp_path)
    refused = CliRunner().invoke(app, ["run", str(tmp_path / "run.yaml")])
    assert refused.exit_code == 2 and "coldfusion flower app" in refused.output
    written = CliRunner().invoke(app, ["flower", "app", str(tmp_path / "run.yaml"), str(tmp_path / "cli-app")])
    assert written.exit_code == 0, written.output
    toml = (tmp_path / "cli-app" / "pyproject.toml").read_text()
    assert 'serverapp = "coldfusion.collab.flower.server_app:app"' in toml and str(tmp_path / "run.yaml") in toml


def _task_specs(tasks: dict, root) -> dict[str, str]:
    """Each contributor's node config: a task-spec YAML only its SuperNode reads."""
    specs = {}
    for name, path in tasks.items():
        specs[name] = str(root / f"{name}.task.yaml")
        (root / f"{name}.task.yaml").write_text(yaml.safe_dump({"name": name, "path": str(path)}))
    return specs


def _deployment(tiny_model_dir, tasks, tmp_path, **flower):
    config = tiny_config(tiny_model_dir, tasks, tmp_path / "flower").model_copy(
        update={"engine": "flower", "flower": FlowerSettings(mode="deployment", **flower)})
    (tmp_path / "run.yaml").write_text(dump_config(config))
    return write_app(tmp_path / "run.yaml", tmp_path / "app"), tmp_path / "flower" / "runs" / config.name


def _stopped(pid: int) -> bool:
    return not deployment.is_running(pid)  # a zombie has ended, only its parent has not reaped it


def test_deployment_on_loopback_fuses_what_the_local_engine_fuses(tiny_model_dir, three_tasks, tmp_path):
    """A SuperLink and three SuperNodes as processes on 127.0.0.1, two rounds via `flwr run`."""
    local = run_cold_fusion(tiny_config(tiny_model_dir, three_tasks, tmp_path / "local"))
    app, run_dir = _deployment(tiny_model_dir, three_tasks, tmp_path)
    with LocalFederation(tmp_path / "federation", _task_specs(three_tasks, tmp_path)) as federation:
        finished = federation.run(app, timeout=900)
        started = [p.pid for p in federation.processes.values()]
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # the SuperLink, three SuperNodes and the SuperExecs they started: all stopped
    assert len(started) == 4 and set(started) < federation.stopped
    assert all(_stopped(pid) for pid in federation.stopped)
    a, b = final_body(local), final_body(run_dir)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_a_supernode_killed_mid_round_is_recorded_missing(tiny_model_dir, three_tasks, tmp_path):
    app, run_dir = _deployment(tiny_model_dir, three_tasks, tmp_path, min_contributors=2, round_timeout=240)
    with LocalFederation(tmp_path / "federation", _task_specs(three_tasks, tmp_path)) as federation:
        started = federation.run(app, stream=False)
        assert started.returncode == 0, started.stdout + started.stderr
        log = tmp_path / "federation" / "supernode-mood.log"
        deadline = time.monotonic() + 300
        while "Receiving: train message" not in log.read_text():
            assert time.monotonic() < deadline, "the first round never reached the SuperNode"
            time.sleep(0.5)
        federation.kill_node("mood")  # while it trains
        deadline = time.monotonic() + 900
        while not (run_dir / "state.json").exists() or json.loads((run_dir / "state.json").read_text())[
                "completed_iterations"] < 2:
            assert time.monotonic() < deadline, (tmp_path / "federation" / "superlink.log").read_text()[-3000:]
            time.sleep(1)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    assert [f["contributors"] for f in fusions] == [["sentiment", "topic"]] * 2
    assert all(set(f["missing"]) == {"mood"} for f in fusions)
    assert fusions[0]["missing"]["mood"].startswith("no reply")  # killed mid-round
    assert fusions[1]["missing"]["mood"] == "its SuperNode is not connected"  # gone by the next round
    lineage = Repository(run_dir / "repository").lineage(fusions[-1]["version"])
    assert [set(v.fusion.get("missing", {})) for v in lineage[:2]] == [{"mood"}, {"mood"}]


def test_tls_and_supernode_authentication_on_loopback(tiny_model_dir, three_tasks, tmp_path):
    """HTTPS against a CA, and a SuperLink that admits only registered SuperNode keys."""
    config = tiny_config(tiny_model_dir, three_tasks, tmp_path / "flower", iterations=1).model_copy(
        update={"engine": "flower", "flower": FlowerSettings(mode="deployment")})
    (tmp_path / "run.yaml").write_text(dump_config(config))
    app_dir = write_app(tmp_path / "run.yaml", tmp_path / "app")
    certificates = make_certificates(tmp_path / "certs")
    with LocalFederation(tmp_path / "federation", _task_specs(three_tasks, tmp_path), tls=certificates,
                         authenticate=True) as federation:
        # An unregistered SuperNode claiming a contributor's task: were it let in, the
        # ServerApp would stop at "two SuperNodes hold the task 'mood'".
        federation.start_node("mood", label="intruder", register=False)
        finished = federation.run(app_dir, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    log = (tmp_path / "federation" / "superlink.log").read_text()
    assert "TLS disabled" not in log and "authentication is disabled" not in log
    assert len(list((tmp_path / "federation" / "keys").glob("*.pub"))) == 4  # 3 registered, 1 not
    assert "Failed to activate SuperNode" in (tmp_path / "federation" / "intruder.log").read_text()
    state = json.loads((config.output_dir / config.name / "state.json").read_text())
    assert state["completed_iterations"] == 1


def _left_running(flwr_home: Path) -> list[int]:
    """Processes still running with this Flower home in their environment (all that a
    federation starts inherit it)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and not _stopped(int(environ.parent.name)):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_flower_local_through_the_cli(tiny_model_dir, three_tasks, tmp_path):
    """`coldfusion flower local` runs a real loopback deployment and leaves nothing running."""
    config = tiny_config(tiny_model_dir, three_tasks, tmp_path / "flower", iterations=1).model_copy(
        update={"engine": "flower", "flower": FlowerSettings(mode="deployment")})
    (tmp_path / "run.yaml").write_text(dump_config(config))
    result = CliRunner().invoke(app, ["flower", "local", str(tmp_path / "run.yaml"), "--workdir", str(tmp_path / "fl")])
    assert result.exit_code == 0, result.output
    state = json.loads((config.output_dir / config.name / "state.json").read_text())
    assert state["completed_iterations"] == 1
    assert sorted(p.name for p in (tmp_path / "fl" / "tasks").iterdir()) == sorted(f"{t}.yaml" for t in three_tasks)
    assert _left_running(tmp_path / "fl" / "flwr-home") == []
