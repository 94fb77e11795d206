"""ColD Fusion on Flower: the same loop, with contributors as Flower ClientApps that keep
their data, settings and heads on their own nodes."""

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import make_sentiment_rows, make_topic_rows
from test_loop import final_body, tiny_config
from typer.testing import CliRunner

flwr = pytest.importorskip("flwr")

from coldfusion.cli import app  # noqa: E402
from coldfusion.collab import run_cold_fusion  # noqa: E402
from coldfusion.collab.config import AttackSettings, FusionSettings, dump_config, parse_config  # noqa: E402
from coldfusion.collab.consortium import ConsortiumSettings  # noqa: E402
from coldfusion.collab.flower import deployment  # noqa: E402
from coldfusion.collab.flower.deployment import LocalFederation, write_app  # noqa: E402
from coldfusion.collab.flower.messages import (  # noqa: E402
    consortium_record,
    contribution_content,
    declined_content,
    from_record,
    read_consortium,
    to_record,
)
from coldfusion.collab.flower.security import make_certificates  # noqa: E402
from coldfusion.collab.flower.simulation import run_on_simulation  # noqa: E402
from coldfusion.collab.flower.strategy import ColdFusionStrategy  # noqa: E402
from coldfusion.contributors.contributor import ContributionResult  # noqa: E402
from coldfusion.encodings import EncodingSettings  # noqa: E402
from coldfusion.repository import Repository  # noqa: E402
from coldfusion.repository.outer import OuterSettings  # noqa: E402
from coldfusion.repository.validation import ValidationSettings  # noqa: E402

TIMINGS = {"seconds", "train_seconds", "fuse_seconds", "iteration_seconds"}


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def test_strategy_fuses_the_replies_with_our_operators_and_reports_failures(monkeypatch):
    """aggregate_train = `weighted` over the bodies (by example counts) that pass validation;
    an error reply is a failure, a body with NaNs is refused, a decline is a decline."""
    from flwr.app import Error, Message
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, value)
    strategy = ColdFusionStrategy("weighted", min_contributors=2)
    strategy.targets = [11, 12, 13, 14, 15]
    base = {"w": torch.zeros(3), "ids": torch.arange(3)}
    consortium = ConsortiumSettings.of_run(parse_config({"tasks": ["x"]}), "run1")
    sent = list(strategy.configure_train(4, to_record(base), consortium_record(consortium), None))
    assert [m.metadata.dst_node_id for m in sent] == [11, 12, 13, 14, 15]
    assert read_consortium(sent[0].content.config_records["config"]) == (consortium, 4)  # the round travels too
    bodies = [{"w": torch.tensor([1.0, -2.0, 4.0]), "ids": torch.arange(3)},
              {"w": torch.tensor([4.0, 1.0, -2.0]), "ids": torch.arange(3)}]
    replies = [Message(contribution_content(ContributionResult(f"c{i}", f"c{i}", body, 10 * (i + 1))), reply_to=m)
               for i, (m, body) in enumerate(zip(sent, bodies, strict=False))]
    replies.append(Message(Error(code=5, reason="node went away"), reply_to=sent[2]))
    broken = {"w": torch.tensor([1.0, float("nan"), 0.0]), "ids": torch.arange(3)}
    replies.append(Message(contribution_content(ContributionResult("c3", "c3", broken, 99)), reply_to=sent[3]))
    replies.append(Message(declined_content("its budget is spent"), reply_to=sent[4]))
    results, declined, failures = strategy.contributions(replies)
    assert sorted(results) == [11, 12, 14] and failures == {13: "node went away"}
    assert declined == {15: "its budget is spent"}
    arrays, metrics = strategy.aggregate_train(4, replies)
    fused = from_record(arrays)
    assert torch.allclose(fused["w"], torch.tensor([3.0, 0.0, 0.0]))  # (10 a + 20 b) / 30; c3 refused
    assert torch.equal(fused["ids"], torch.arange(3))
    assert metrics["contributors"] == 2 and metrics["refused"] == 1 and metrics["num-examples"] == 30
    strategy.min_contributors = 4
    assert strategy.aggregate_train(4, replies) == (None, None)


def test_the_strategy_and_the_repository_admit_and_fuse_alike_to_the_byte(tmp_path):
    """The same bodies through Flower's strategy and through a repository's admission and
    fusion, with an outer optimizer: the same refusals (by rule) and the same bytes."""
    from coldfusion.io.checkpoint import serialize
    from coldfusion.repository.intake import Refused

    torch.manual_seed(0)
    base = {"w": torch.randn(64), "v": torch.randn(8, 8), "ids": torch.arange(3)}
    step = lambda scale, seed: {k: (v + scale * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))  # noqa: E731
                                    if v.is_floating_point() else v) for k, v in base.items()}
    bodies = [step(0.01, 1), step(0.02, 2), step(0.015, 3), step(1000.0, 4), step(0.0, 5), step(0.01, 1)]
    names = ["a", "b", "c", "scaled", "same", "copy"]
    outer = OuterSettings(lr=0.7, momentum=0.9, nesterov=True)
    strategy = ColdFusionStrategy("weighted", outer=outer)
    results = [ContributionResult(n, n, body, 10 * (i + 1))
               for i, (n, body) in enumerate(zip(names, bodies, strict=True))]
    from_strategy, refused = strategy.fuse(results, base)
    assert {n: why.split(":")[0] for n, why in refused.items()} == {
        "scaled": "refused (norm)", "same": "refused (no-op)", "copy": "refused (duplicate)"}
    repo = Repository(tmp_path / "repo")
    v1 = repo.add_version(base, model_source="test")
    ids = []
    for r in results:
        try:
            ids.append(repo.add_contribution(r.body, base_version=v1.id, contributor=r.contributor, task="t",
                                             num_examples=r.num_examples).id)
        except Refused as exc:
            assert str(exc).startswith(refused[r.contributor].split(":")[0])
    fused = repo.fuse(v1.id, ids, method="weighted", outer=outer)
    assert len(ids) == 3 and serialize(repo.load_version(fused.id)) == serialize(from_strategy)


def test_strategy_takes_the_outer_optimizers_step_and_carries_its_momentum_across_rounds(monkeypatch):
    """With outer lr 0.5, momentum 0.5 (SGD without dampening): round 1 from 0 to a body of
    2 steps to 1 (buffer -2); round 2 from 1 to a body of 3 steps to 2.5 (buffer -3). Plain
    fusion would give 2 and 3."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    strategy = ColdFusionStrategy("average", outer=OuterSettings(lr=0.5, momentum=0.5),
                                  validation=ValidationSettings(base_norm_factor=None))  # round numbers, large steps
    strategy.targets = [11]
    consortium = consortium_record(ConsortiumSettings.of_run(parse_config({"tasks": ["x"]}), "run1"))
    base = {"w": torch.zeros(3), "ids": torch.arange(3)}
    for server_round, (body_value, expected) in enumerate([(2.0, 1.0), (3.0, 2.5)], start=1):
        [sent] = strategy.configure_train(server_round, to_record(base), consortium, None)
        body = {"w": torch.full((3,), body_value), "ids": torch.arange(3)}
        reply = Message(contribution_content(ContributionResult("c0", "c0", body, 10)), reply_to=sent)
        arrays, _ = strategy.aggregate_train(server_round, [reply])
        base = from_record(arrays)
        assert torch.allclose(base["w"], torch.full((3,), expected))
        assert torch.equal(base["ids"], torch.arange(3))  # integer tensors are the fused ones


@pytest.fixture(scope="module")
def three_tasks(toy_task_files, tmp_path_factory):
    """The two toy tasks plus a third contributor (sentiment in other words)."""
    root = tmp_path_factory.mktemp("third-task")
    pd.DataFrame(make_sentiment_rows(300, seed=3, words_pos=["bright", "warm", "sweet"],
                                     words_neg=["grim", "cold", "sour"])).to_csv(root / "mood.csv", index=False)
    return {**toy_task_files, "mood": root / "mood.csv"}


def _recording_mod(path: Path):
    """A Flower mod that writes down what every message a node receives carries (its config
    records' text and its array names), as the node sees it."""
    def mod(msg, context, call_next):
        content = msg.content
        seen = {"type": msg.metadata.message_type, "node": int(context.node_config["partition-id"]),
                "config": {name: {k: str(v) for k, v in record.items()}
                           for name, record in content.config_records.items()},
                "arrays": {name: sorted(record.keys()) for name, record in content.array_records.items()}}
        with open(path, "a") as f:
            f.write(json.dumps(seen) + "\n")
        return call_next(msg, context)
    return mod


def test_simulation_gives_the_local_engines_rows_and_nodes_receive_only_the_consortiums_settings(
        tiny_model_dir, three_tasks, tmp_path):
    """The same seeds give the same results.jsonl rows (apart from timings) on the local engine
    and on Flower's simulation runtime, RegMean over sparse contributions included (Gram
    matrices travel with the encoded bodies) and the outer optimizer, whose momentum the
    run's repository keeps from round to round. Every message a simulated node receives holds
    the consortium's settings and the base, never a task spec, a path, a contributor's name
    or the attack block."""
    update = {"fusion": FusionSettings(method="regmean", outer=OuterSettings(lr=0.7, momentum=0.9, nesterov=True)),
              "contribution": EncodingSettings(kind="sparse", density=0.5, dtype="float32")}
    local = run_cold_fusion(tiny_config(tiny_model_dir, three_tasks, tmp_path / "local").model_copy(update=update))
    config = tiny_config(tiny_model_dir, three_tasks, tmp_path / "flower").model_copy(
        update={"engine": "flower", **update})
    received = tmp_path / "received.jsonl"
    flower = run_on_simulation(config, client_mods=[_recording_mod(received)])
    a, b = final_body(local), final_body(flower)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert without_timings(rows_of(flower)) == without_timings(rows_of(local))
    fusions = [r for r in rows_of(flower) if r["kind"] == "fusion"]
    assert [f["contributors"] for f in fusions] == [list(three_tasks)] * 2 and all(not f["missing"] for f in fusions)
    assert all(f["method"] == "regmean" and f["encoding"] == "sparse" for f in fusions)
    assert {c.encoding["kind"] for c in Repository(flower / "repository").contributions()} == {"sparse"}
    last = Repository(flower / "repository").latest()
    assert last.fusion["outer"]["momentum_from"] == last.parent  # round 2 continued round 1's buffer
    probes = [r for r in rows_of(flower) if r["kind"] == "probe"]
    assert {(r["task"], r["iteration"]) for r in probes} == {(t, i) for t in three_tasks for i in (0, 1, 2)}
    assert all(r["scored_by"] == "contributor" and set(r["test_correct"]) <= {"0", "1"} for r in probes)

    messages = [json.loads(line) for line in received.read_text().splitlines()]
    kinds = {m["type"] for m in messages}
    assert kinds == {"query", "train", "evaluate"}
    assert sum(m["type"] == "train" for m in messages) == 3 * 2 and sum(m["type"] == "evaluate" for m in messages) == 9
    for m in messages:
        assert set(m["config"]) <= {"config"} and set(m["arrays"]) <= {"arrays"}
        if m["config"]:
            assert set(m["config"]["config"]) == {"consortium", "server-round"}
            assert set(json.loads(m["config"]["config"]["consortium"])) == set(ConsortiumSettings.model_fields)
        text = json.dumps(m["config"])
        for name, path in three_tasks.items():
            assert str(path) not in text and str(path.parent) not in text and name not in text
        assert "attack" not in text and str(tmp_path) not in text


def test_attack_block_and_other_settings_never_reach_a_node(tiny_model_dir, three_tasks):
    """What a node receives is the consortium's settings: every field of it is listed here;
    the attack block, the tasks, paths, the repository and the fusion method are not."""
    config = tiny_config(tiny_model_dir, three_tasks, Path("/srv/runs")).model_copy(
        update={"attack": AttackSettings(contributors=["mood"], kind="scale", factor=7.5)})
    consortium = ConsortiumSettings.of_run(config, "run1")
    record = consortium_record(consortium, 3)
    assert set(record) == {"consortium", "server-round"}
    text = str(record["consortium"])
    assert set(json.loads(text)) == {
        "run_id", "seed", "model", "max_length", "pooling", "examples_per_round", "validation_examples", "keep_head",
        "finetune", "contribution", "statistics", "statistics_examples", "evaluation"}
    assert consortium.model is None  # the model is a directory on the server: each node names its copy
    for secret in ["mood", "sentiment", "topic", "7.5", "attack", "/srv/runs", str(tiny_model_dir),
                   *(str(p) for p in three_tasks.values())]:
        assert secret not in text, secret


def test_the_client_app_says_who_it_is_scores_declines_and_names_no_path_in_errors(
        tiny_model_dir, toy_task_files, tmp_path, monkeypatch):
    """The deployment ClientApp called as Flower calls it, with a node config per case."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from coldfusion.collab.flower.client_app import app as client_app
    from coldfusion.collab.flower.messages import ARRAYS, CONFIG, read_declined, read_scores
    from coldfusion.models.encoder import Encoder

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a SuperLink's run
        monkeypatch.setattr(TaskIdentity, attr, value)
    (tmp_path / "sentiment.yaml").write_text(yaml.safe_dump({"name": "sentiment",
                                                             "path": str(toy_task_files["sentiment"])}))

    def ask(message_type: str, node_config: dict, content: RecordDict | None = None) -> Message:
        msg = Message(content or RecordDict(), dst_node_id=5, message_type=message_type)
        context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
        return client_app(msg, context)

    def who(node_config: dict) -> dict:
        reply = ask(MessageType.QUERY, node_config)
        return {"error": reply.error.reason} if reply.has_error() else dict(reply.content.config_records["contributor"])

    good = {"task": str(tmp_path / "sentiment.yaml"), "model": str(tiny_model_dir), "threads": 1,
            "state-dir": str(tmp_path / "state")}
    assert who(good) == {"name": "sentiment"}
    assert who({**good, "contributor": "acme"}) == {
        "name": "acme", "problem": "node config contributor='acme', but its task is named 'sentiment'"}
    missing = str(tmp_path / "private" / "gone.yaml")
    assert who({"task": missing, "contributor": "acme"}) == {"name": "acme",
                                                             "problem": "node config task: no such file"}
    assert who({"task": missing}) == {"error": "node config task: no such file"}
    assert "unknown key 'tsak'" in who({"tsak": missing})["error"]

    config = tiny_config(tiny_model_dir, toy_task_files, tmp_path / "server")
    consortium = ConsortiumSettings.of_run(config, "run1")
    base = to_record(Encoder.load(str(tiny_model_dir)).pretrained)
    scored = ask(MessageType.EVALUATE, good, RecordDict({ARRAYS: base, CONFIG: consortium_record(consortium, 0)}))
    scores = read_scores(scored.content)
    assert set(scores) == {"accuracy", "macro_f1", "l2", "validation_accuracy", "test_correct"}
    assert len(scores["test_correct"]) == 60 and 0 <= scores["accuracy"] <= 1
    declined = ask(MessageType.TRAIN, {**good, "last-round": 1},
                   RecordDict({ARRAYS: base, CONFIG: consortium_record(consortium, 2)}))
    assert read_declined(declined.content) == "it trains in rounds up to 1 only (node config last-round)"
    # no `device` in the node config: `auto`, so this trains on a GPU where there is one
    trained = ask(MessageType.TRAIN, good, RecordDict({ARRAYS: base, CONFIG: consortium_record(consortium, 1)}))
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    body = from_record(trained.content.array_records[ARRAYS])
    assert body.keys() == from_record(base).keys() and all(t.device.type == "cpu" for t in body.values())
    assert list((tmp_path / "state" / "run1" / "sentiment").glob("iter0001.safetensors"))  # its head, kept
    if torch.cuda.is_available():  # it did train there
        assert torch.cuda.max_memory_allocated() > 0


# -- loopback deployments -------------------------------------------------------------


def _server_config(tiny_model_dir, names, root: Path, **flower) -> Path:
    """The server's run config: it names the contributors, nothing of their data."""
    data = yaml.safe_load(dump_config(tiny_config(tiny_model_dir, {"x": "x.csv"}, root / "server")))
    data.update(tasks=[], contributors=list(names), engine="flower",
                flower={**data["flower"], "mode": "deployment", **flower})
    (root / "server").mkdir(parents=True, exist_ok=True)
    path = root / "server" / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _node(root: Path, name: str, source: Path, model: Path, **settings) -> dict:
    """A contributor's node directory (its own copy of its data, its task spec, its state)
    and node config (with its own copy of the model: the server's is a directory there)."""
    home = root / "nodes" / name
    home.mkdir(parents=True, exist_ok=True)
    data = home / source.name
    data.write_bytes(source.read_bytes())
    (home / "task.yaml").write_text(yaml.safe_dump({"name": name, "path": str(data)}))
    return {"task": str(home / "task.yaml"), "state-dir": str(home / "state"), "threads": 1,
            "model": str(model), **settings}


def _stopped(pid: int) -> bool:
    return not deployment.is_running(pid)  # a zombie has ended, only its parent has not reaped it


def _wait_for_iteration(run_dir: Path, iteration: int, federation: LocalFederation, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "state.json").exists() or json.loads((run_dir / "state.json").read_text())[
            "completed_iterations"] < iteration:
        assert time.monotonic() < deadline, federation.log("superlink").read_text()[-3000:]
        time.sleep(1)


def _private_corpus(root: Path) -> dict[str, Path]:
    """Each contributor's data, every text and label marked so that a leak is found by search."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows in (("sentiment", make_sentiment_rows(400, seed=1)), ("topic", make_topic_rows(450, seed=2)),
                       ("mood", make_sentiment_rows(300, seed=3, words_pos=["bright", "warm", "sweet"],
                                                    words_neg=["grim", "cold", "sour"]))):
        marked = [{"text": f"{r['text']} zqprivate{name}{i}", "label": f"zqlabel{r['label']}"}
                  for i, r in enumerate(rows)]
        pd.DataFrame(marked).to_csv(root / f"{name}.csv", index=False)
        files[name] = root / f"{name}.csv"
    return files


def test_private_deployment_keeps_every_contributors_data_on_its_node(tiny_model_dir, tmp_path):
    """A SuperLink and three SuperNodes as processes on 127.0.0.1, two rounds via `flwr run`.
    Each contributor's task file and data exist only in its SuperNode's directory; nothing
    the server side holds (run config, app directory, SuperLink state and messages, logs,
    repository, results) names a contributor's path or holds its texts or labels. Each
    base is scored by the contributors on their own data, and the bodies are the local
    engine's."""
    corpus = _private_corpus(tmp_path / "originals")
    local = run_cold_fusion(tiny_config(tiny_model_dir, corpus, tmp_path / "local"))
    root = tmp_path / "federation"
    server_config = _server_config(tiny_model_dir, corpus, root)
    nodes = {name: _node(root, name, path, tiny_model_dir, **{"audit-log": str(root / "nodes" / name / "audit.jsonl")})
             for name, path in corpus.items()}
    app_dir = write_app(server_config, root / "server" / "app")
    with LocalFederation(root, nodes) as federation:
        finished = federation.run(app_dir, timeout=900)
        started = [p.pid for p in federation.processes.values()]
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # the SuperLink, three SuperNodes and the SuperExecs they started: all stopped
    assert len(started) == 4 and set(started) < federation.stopped
    assert all(_stopped(pid) for pid in federation.stopped)

    run_dir = root / "server" / "runs" / "tiny"
    a, b = final_body(local), final_body(run_dir)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    probes = [r for r in rows_of(run_dir) if r["kind"] == "probe"]
    assert {(r["task"], r["iteration"]) for r in probes} == {(t, i) for t in corpus for i in (0, 1, 2)}
    assert all(r["scored_by"] == "contributor" for r in probes)
    local_probes = [r for r in rows_of(local) if r["kind"] == "probe"]
    assert without_timings(probes) == without_timings(local_probes)  # the same numbers, scored on the nodes
    assert "| sentiment |" in (run_dir / "summary.md").read_text()
    for name in corpus:  # heads stayed on the nodes
        assert list((root / "nodes" / name / "state").rglob("iter*.safetensors"))

    secrets = [str(root / "nodes"), str(tmp_path / "originals"), *(n["task"] for n in nodes.values())]
    secrets += [str(root / "nodes" / name / path.name) for name, path in corpus.items()]
    server_files = [p for p in (root / "server").rglob("*") if p.is_file()]
    assert root / "server" / "state.db" in server_files and run_dir / "results.jsonl" in server_files
    for path in server_files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{path} names {secret}"
        assert not re.search(rb"zqprivate|zqlabel", content), f"{path} holds a contributor's text or label"

    # Every message that crossed the line, as each node wrote it down (node config audit-log)
    body_keys = set(a)
    for name in corpus:
        entries = [json.loads(line) for line in (root / "nodes" / name / "audit.jsonl").read_text().splitlines()]
        assert {(e["direction"], e["type"]) for e in entries} == {
            (d, t) for d in ("received", "sent") for t in ("query", "train", "evaluate")}
        text = json.dumps(entries)
        for secret in secrets + [str(root / "nodes" / name)]:
            assert secret not in text, f"a message of {name} names {secret}"
        assert not re.search(r"zqprivate|zqlabel", text), f"a message of {name} holds its text or labels"
        assert not any(other in text for other in corpus if other != name)  # nothing of the others either
        for e in entries:
            assert "error" not in e, e
            if e["direction"] == "received" and e["type"] != "query":
                assert set(e["config"]) == {"config"} and set(e["config"]["config"]) == {"consortium", "server-round"}
            if e["direction"] == "sent" and e["type"] == "train":  # the body, its example count, its name
                assert set(e["arrays"]) == {"arrays"} and set(e["arrays"]["arrays"]) == body_keys
            if e["direction"] == "sent" and e["type"] == "evaluate":  # numbers only
                assert e["arrays"] == {} and set(e["metrics"]["scores"]) == {
                    "accuracy", "macro_f1", "l2", "validation_accuracy"}
                assert set(e["config"]["correct"]["test_correct"]) <= {"0", "1"}


def test_contributors_that_die_decline_or_cannot_start_are_recorded_and_the_rounds_go_on(
        tiny_model_dir, three_tasks, tmp_path):
    """`mood`'s SuperNode is killed mid-round; `topic` trains in round 1 only (last-round=1)
    and declines round 2; `broken` names a task file that does not exist. Each is recorded
    with its reason (the broken one's names the node config key, not the file) and every
    round is fused from the others."""
    root = tmp_path / "federation"
    names = [*three_tasks, "broken"]
    server_config = _server_config(tiny_model_dir, names, root, min_contributors=1, round_timeout=240)
    nodes = {name: _node(root, name, path, tiny_model_dir) for name, path in three_tasks.items()}
    nodes["topic"]["last-round"] = 1
    nodes["broken"] = {"contributor": "broken", "task": str(root / "nodes" / "broken" / "nowhere.yaml"),
                       "threads": 1}
    app_dir = write_app(server_config, root / "server" / "app")
    run_dir = root / "server" / "runs" / "tiny"
    with LocalFederation(root, nodes) as federation:
        started = federation.run(app_dir, stream=False)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 300
        while "Receiving: train message" not in federation.log("mood").read_text():
            assert time.monotonic() < deadline, "the first round never reached the SuperNode"
            time.sleep(0.5)
        federation.kill_node("mood")  # while it trains
        _wait_for_iteration(run_dir, 2, federation)
        assert "node config task=" in federation.log("broken").read_text()  # the node's own log names key and file
    rows = rows_of(run_dir)
    fusions = [r for r in rows if r["kind"] == "fusion"]
    assert [f["contributors"] for f in fusions] == [["sentiment", "topic"], ["sentiment"]]
    assert fusions[0]["missing"]["mood"].startswith("no reply")  # killed mid-round
    assert fusions[1]["missing"]["mood"] == "its SuperNode is not connected"  # gone by the next round
    for f in fusions:
        assert f["missing"]["broken"].startswith("node config task: no such file")
        assert str(root) not in f["missing"]["broken"]
    assert fusions[0]["declined"] == {} and fusions[1]["declined"] == {
        "topic": "it trains in rounds up to 1 only (node config last-round)"}
    lineage = Repository(run_dir / "repository").lineage(fusions[-1]["version"])
    assert [set(v.fusion.get("missing", {})) for v in lineage[:2]] == [{"mood", "broken"}, {"mood", "broken"}]
    assert lineage[0].fusion["declined"] == {"topic": fusions[1]["declined"]["topic"]}
    unscored = {(r["task"], r["iteration"]) for r in rows if r["kind"] == "unscored"}
    assert {("broken", i) for i in (0, 1, 2)} <= unscored and ("mood", 2) in unscored
    summary = (run_dir / "summary.md").read_text()
    assert "- iteration 2: topic declined: it trains in rounds up to 1" in summary


def test_a_killed_flower_run_resumes_with_its_contributors_heads(tiny_model_dir, three_tasks, tmp_path):
    """The whole federation (SuperLink, SuperNodes, ServerApp) is killed after round 1; a new
    one resumes the run. The nodes' heads were kept in their state directories, so the
    result is the uninterrupted local run's (with fresh heads it would not be)."""
    local = run_cold_fusion(tiny_config(tiny_model_dir, three_tasks, tmp_path / "local"))
    root = tmp_path / "federation"
    server_config = _server_config(tiny_model_dir, three_tasks, root)
    nodes = {name: _node(root, name, path, tiny_model_dir) for name, path in three_tasks.items()}
    run_dir = root / "server" / "runs" / "tiny"
    with LocalFederation(root, nodes) as federation:
        started = federation.run(write_app(server_config, root / "server" / "app"), stream=False)
        assert started.returncode == 0, started.stdout + started.stderr
        _wait_for_iteration(run_dir, 1, federation)
    assert json.loads((run_dir / "state.json").read_text())["completed_iterations"] == 1
    again = LocalFederation(tmp_path / "federation-again", nodes)  # a new SuperLink; the nodes keep their state
    with again:
        finished = again.run(write_app(server_config, root / "server" / "app-resume", resume=True), timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["completed_iterations"] == 2
    a, b = final_body(local), final_body(run_dir)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert [r["iteration"] for r in rows_of(run_dir) if r["kind"] == "fusion"] == [1, 2]


def test_tls_and_supernode_authentication_on_loopback(tiny_model_dir, three_tasks, tmp_path):
    """HTTPS against a CA, and a SuperLink that admits only registered SuperNode keys."""
    root = tmp_path / "federation"
    server_config = _server_config(tiny_model_dir, three_tasks, root)
    data = yaml.safe_load(server_config.read_text())
    data["loop"]["iterations"] = 1
    server_config.write_text(yaml.safe_dump(data))
    nodes = {name: _node(root, name, path, tiny_model_dir) for name, path in three_tasks.items()}
    app_dir = write_app(server_config, root / "server" / "app")
    certificates = make_certificates(tmp_path / "certs")
    with LocalFederation(root, nodes, tls=certificates, authenticate=True) as federation:
        # An unregistered SuperNode claiming a contributor's task: were it let in, the
        # ServerApp would stop at "two SuperNodes are contributor 'mood'".
        federation.start_node("mood", label="intruder", register=False)
        finished = federation.run(app_dir, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    log = federation.log("superlink").read_text()
    assert "TLS disabled" not in log and "authentication is disabled" not in log
    assert len(list((root / "nodes").glob("*/keys/*.pub"))) == 4  # 3 registered, 1 not
    assert "Failed to activate SuperNode" in federation.log("intruder").read_text()
    state = json.loads((root / "server" / "runs" / "tiny" / "state.json").read_text())
    assert state["completed_iterations"] == 1


def test_deployment_configs_name_contributors_and_get_the_flower_app(tiny_model_dir, three_tasks, tmp_path):
    root = tmp_path / "federation"
    server_config = _server_config(tiny_model_dir, three_tasks, root)
    refused = CliRunner().invoke(app, ["run", str(server_config)])
    assert refused.exit_code == 2 and "coldfusion flower app" in " ".join(refused.output.split())
    written = CliRunner().invoke(app, ["flower", "app", str(server_config), str(tmp_path / "cli-app")])
    assert written.exit_code == 0, written.output
    toml = (tmp_path / "cli-app" / "pyproject.toml").read_text()
    assert 'serverapp = "coldfusion.collab.flower.server_app:app"' in toml and str(server_config) in toml
    # a deployment's server config that lists tasks with their data is refused, with the way out
    data = yaml.safe_load(server_config.read_text())
    data["tasks"] = [{"name": "sentiment", "path": str(three_tasks["sentiment"])}]
    server_config.write_text(yaml.safe_dump(data))
    refused = CliRunner().invoke(app, ["flower", "app", str(server_config), str(tmp_path / "other-app")])
    assert refused.exit_code == 2 and "names its contributors, not their data" in " ".join(refused.output.split())


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
    """`coldfusion flower local` cuts a one-file config into the server's config and one
    directory per node, runs a real loopback deployment and leaves nothing running."""
    config = tiny_config(tiny_model_dir, three_tasks, tmp_path / "flower", iterations=1).model_copy(
        update={"engine": "flower"})
    (tmp_path / "run.yaml").write_text(dump_config(config))
    result = CliRunner().invoke(app, ["flower", "local", str(tmp_path / "run.yaml"), "--workdir", str(tmp_path / "fl")])
    assert result.exit_code == 0, result.output
    state = json.loads((config.output_dir / config.name / "state.json").read_text())
    assert state["completed_iterations"] == 1
    assert sorted(p.name for p in (tmp_path / "fl" / "nodes").iterdir()) == sorted(three_tasks)
    server = yaml.safe_load((tmp_path / "fl" / "server" / "run.yaml").read_text())
    assert server["tasks"] == [] and server["contributors"] == list(three_tasks)
    assert not any(str(p) in (tmp_path / "fl" / "server" / "run.yaml").read_text() for p in three_tasks.values())
    assert _left_running(tmp_path / "fl" / "server" / "flwr-home") == []
