"""What a contributor's node holds and decides for itself: its settings (node config), its
task file, its heads across rounds and restarts, declining a round, and error reasons
that name none of its paths."""

import dataclasses
import json

import pytest
import torch
from test_loop import final_body, tiny_config

from coldfusion.collab import run_cold_fusion
from coldfusion.collab.consortium import ConsortiumSettings, contributor_for
from coldfusion.collab.local_engine import LocalEngine
from coldfusion.collab.node import NodeSettings, default_state_dir
from coldfusion.contributors.heads import HeadStore
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.progress import SilentProgress
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository
from coldfusion.tasks import load_task


def test_node_config_is_read_with_flowers_keys_and_errors_name_the_key():
    node = NodeSettings.from_node_config({"task": "t.yaml", "device": "cpu", "threads": 3, "state-dir": "/srv/cf",
                                          "last-round": 4, "batch-size": 8, "partition-id": 0})
    assert (node.task, node.threads, str(node.state_dir), node.last_round, node.batch_size) == (
        "t.yaml", 3, "/srv/cf", 4, 8)
    assert NodeSettings.from_node_config({"task": "t.yaml"}).state_dir == default_state_dir()  # heads kept by default
    with pytest.raises(ColdFusionError, match=r"node config: unknown key 'treads' \(known: .*threads"):
        NodeSettings.from_node_config({"task": "t.yaml", "treads": 2})
    with pytest.raises(ColdFusionError, match=r"node config: threads: Input should be greater than or equal to 1"):
        NodeSettings.from_node_config({"task": "t.yaml", "threads": 0})


@pytest.fixture
def node_task():
    pytest.importorskip("flwr")
    from coldfusion.collab.flower.client_app import node_task, public_reason

    return node_task, public_reason


def test_a_node_task_that_is_missing_unreadable_or_malformed_is_refused_naming_the_key_and_file(node_task, tmp_path):
    read, public = node_task
    with pytest.raises(ColdFusionError, match="this SuperNode has no task: start it with --node-config"):
        read(NodeSettings())
    cases = {
        "absent.yaml": (None, "no such file"),
        "binary.yaml": (b"\xff\xfe\x00task", "cannot read the task spec"),
        "syntax.yaml": (b"name: [unclosed", "cannot read the task spec"),
        "list.yaml": (b"- name: a\n", "a task spec is a YAML mapping"),
        "keys.yaml": (b"name: a\npth: data.csv\n", "unknown key 'pth'"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / "private" / name
        if content is not None:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(content)
        node = NodeSettings(task=str(path))
        with pytest.raises(ColdFusionError) as caught:
            read(node)
        message = str(caught.value)
        assert f"node config task={str(path)!r}" in message and problem in message, message  # the node's own log
        reason = public(message, node)  # what the server is told
        assert reason.startswith("node config task") and problem in reason and str(tmp_path) not in reason, reason
    assert read(NodeSettings(task="bbc_topic")).name == "bbc_topic"  # a built-in name needs no file


def test_reasons_sent_to_the_server_name_no_path_of_the_node(node_task, tmp_path):
    _, public = node_task
    node = NodeSettings(task=str(tmp_path / "t.yaml"), state_dir=tmp_path / "state", model=str(tmp_path / "m"))
    text = (f"could not write {tmp_path / 'state' / 'x'}; model {tmp_path / 'm'} broken; "
            f"/etc/other/file.csv: bad row 3 of data/rel.csv")
    reason = public(text, node)
    assert str(tmp_path) not in reason and "/etc/other" not in reason
    assert "(the file of node config state-dir)" in reason and "(the file of node config model)" in reason
    assert "(a path on the node)" in reason and "bad row 3" in reason


def test_head_store_trains_each_round_from_the_newest_head_saved_before_it(tmp_path):
    store = HeadStore(tmp_path)
    assert store.before(1) is None
    for iteration in (1, 2, 4):
        store.save(iteration, {"w": torch.full((2,), float(iteration))})
    assert float(store.before(5)["w"][0]) == 4.0
    assert float(store.before(4)["w"][0]) == 2.0  # round 4 redone after a crash: the head before it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter0002.safetensors", "iter0004.safetensors"]


def test_a_contributor_declines_a_base_that_does_not_fit_or_is_not_finite_or_past_its_last_round(
        tiny_model_dir, toy_task_files, tmp_path):
    config = tiny_config(tiny_model_dir, toy_task_files, tmp_path)
    encoder = Encoder.load(str(tiny_model_dir))
    node = NodeSettings(model=str(tiny_model_dir), device="cpu", threads=1, last_round=2)
    contributor = contributor_for(ConsortiumSettings.of_run(config, "r"), node, load_task(config.tasks[0]), encoder)
    base = encoder.pretrained
    assert contributor.declines(base, 2) is None
    assert "rounds up to 2 only" in contributor.declines(base, 3)
    name = next(k for k, v in base.items() if v.is_floating_point())
    assert "non-finite values in " + name in contributor.declines({**base, name: base[name] * float("nan")}, 1)
    assert "does not fit its model" in contributor.declines({**base, name: base[name][:1]}, 1)
    assert "does not fit its model" in contributor.declines({k: v for k, v in base.items() if k != name}, 1)

    engine = LocalEngine(config, [load_task(s) for s in config.tasks], encoder, tmp_path / "heads", "r")
    broken = {**base, name: base[name] * float("nan")}
    round_ = engine.run_round(broken, 1, engine.contributor_names, SilentProgress())
    assert round_.results == [] and set(round_.declined) == set(toy_task_files)


def test_the_local_engine_keeps_heads_on_disk_and_a_resumed_run_uses_them(tiny_model_dir, toy_task_files, tmp_path):
    """Heads are kept per contributor and round under <run dir>/heads/RUN_ID/; resuming
    after round 1 gives the uninterrupted run's bodies only because they are read back."""
    full = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "a"))
    part = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "b", iterations=1))
    run_id = (part / "run-id").read_text()
    heads = sorted(p.relative_to(part / "heads" / run_id).as_posix() for p in (part / "heads").rglob("*.safetensors"))
    assert heads == [f"{t}/iter0001.safetensors" for t in sorted(toy_task_files)]
    resumed = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path / "b"), resume=True)
    a, b = final_body(full), final_body(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "run-id").read_text() == run_id  # the run keeps its identity


def test_declines_reach_the_results_lineage_and_report(tiny_model_dir, toy_task_files, tmp_path, monkeypatch):
    """A contributor that declines a round is recorded like a missing one, with its reason."""
    from coldfusion.contributors import contributor as contributor_module

    original = contributor_module.Contributor.declines
    monkeypatch.setattr(contributor_module.Contributor, "declines",
                        lambda self, base, it: "its own checks failed" if (self.name, it) == ("topic", 2)
                        else original(self, base, it))
    run_dir = run_cold_fusion(tiny_config(tiny_model_dir, toy_task_files, tmp_path))
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    assert [f["declined"] for f in fusions] == [{}, {"topic": "its own checks failed"}]
    assert fusions[1]["contributors"] == ["sentiment"]
    version = Repository(run_dir / "repository").version(fusions[1]["version"])
    assert version.fusion["declined"] == {"topic": "its own checks failed"}
    assert "- iteration 2: topic declined: its own checks failed" in (run_dir / "summary.md").read_text()


def test_names_that_would_leave_the_state_directory_are_refused(tiny_model_dir, toy_task_files, tmp_path):
    """A contributor's and a run's names become directories under the node's state-dir."""
    config = tiny_config(tiny_model_dir, toy_task_files, tmp_path)
    task = load_task(config.tasks[0])
    encoder = Encoder.load(str(tiny_model_dir))
    node = NodeSettings(model=str(tiny_model_dir), device="cpu", state_dir=tmp_path / "state")
    for run_id in ("../escaped", ".hidden", "a/b"):
        with pytest.raises(ColdFusionError, match="cannot name a file or directory"):
            contributor_for(ConsortiumSettings.of_run(config, run_id), node, task, encoder)
    task = dataclasses.replace(task, name="../../evil")
    with pytest.raises(ColdFusionError, match=r"contributor '../../evil' cannot name a file or directory"):
        contributor_for(ConsortiumSettings.of_run(config, "run1"), node, task, encoder)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "escaped").exists()


def test_node_configs_for_loopback_supernodes_refuse_values_they_cannot_quote():
    from coldfusion.collab.flower.deployment import node_config_arg

    assert node_config_arg({"task": "/d/t.yaml", "threads": 2, "x": True}) == "task='/d/t.yaml' threads=2 x=true"
    with pytest.raises(ColdFusionError, match="cannot hold a single quote"):
        node_config_arg({"task": "/d/it's.yaml"})


def test_scores_from_a_node_must_be_numbers_and_bits():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from coldfusion.collab.flower.messages import read_scores, scores_content

    scores = {"accuracy": 0.5, "macro_f1": 0.4, "l2": 1e-3, "validation_accuracy": 0.6, "test_correct": "0110"}
    assert read_scores(scores_content(scores)) == scores
    forged = RecordDict({"scores": MetricRecord({"accuracy": 0.5}),
                         "correct": ConfigRecord({"test_correct": "I am text"})})
    with pytest.raises(ValueError, match="a string of 0 and 1"):
        read_scores(forged)
    with pytest.raises(KeyError):
        read_scores(RecordDict({"scores": MetricRecord({"accuracy": 0.5})}))
