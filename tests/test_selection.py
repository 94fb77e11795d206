"""Ranking candidates and intermediate tasks: scores that order bodies the right way, caches
that are reused and resumable, ranking quality with known answers, and both commands."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from coldfusion.cli import app
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository
from coldfusion.selection import features as features_module
from coldfusion.selection.bodies import Encoders, body_of, load_candidate
from coldfusion.selection.cache import digest, split_fingerprint
from coldfusion.selection.harness import TargetResult, evaluate_target, summarize
from coldfusion.selection.rank import rank_candidates
from coldfusion.selection.select import score_sources
from coldfusion.selection.settings import SelectionSettings
from coldfusion.tasks import Split, TaskSpec, load_task

runner = CliRunner()
SMALL = dict(feature_examples=120, validation_examples=60, target_examples=120, test_examples=60, seeds=[0, 1],
             finetune={"epochs": 3, "batch_size": 8, "lr": 1e-3, "head_lr": 1e-2}, source_examples=80,
             source_finetune={"epochs": 1, "lr": 1e-3},
             threads=1)


@pytest.fixture
def settings():
    return SelectionSettings(**SMALL)


def toy(toy_task_files, name):
    return load_task(TaskSpec(name=name, path=toy_task_files[name]))


def blinded(tiny_model_dir):
    """The tiny body with its word embeddings zeroed: its features cannot tell words apart."""
    tensors = dict(Encoder.load(str(tiny_model_dir)).pretrained)
    tensors["embeddings.word_embeddings.weight"] = torch.zeros_like(tensors["embeddings.word_embeddings.weight"])
    return tensors


def test_repository_remembers_results_and_their_tensors(tmp_path):
    repo = Repository(tmp_path / "r")
    assert repo.recall("k") is None
    kept = repo.remember("k", "features", {"seconds": 1.5}, {"x": torch.arange(3.0)})
    again = repo.remember("k", "features", {"seconds": 9.0}, {"x": torch.zeros(3)})  # the first one stays
    assert again == kept == repo.recall("k") and kept.value == {"seconds": 1.5}
    assert torch.equal(repo.load(kept.sha256)["x"], torch.arange(3.0))
    report = repo.verify()
    assert report.ok and not report.unreferenced  # a cached result's tensors are referenced


def test_keys_change_with_any_input():
    split = Split(["a b", "c"], [0, 1])
    assert digest("x", a=1, b=[2]) == digest("x", b=[2], a=1)
    assert len({digest("x", a=1), digest("x", a=2), digest("y", a=1)}) == 3
    assert split_fingerprint(split) == split_fingerprint(Split(["a b", "c"], [0, 1]))
    assert split_fingerprint(split) != split_fingerprint(Split(["a b", "c"], [1, 1]))
    assert split_fingerprint(split) != split_fingerprint(Split(["a b", "c"], [0, 1], pairs=["x", "y"]))


def test_the_same_weights_are_the_same_candidate_however_named(tiny_model_dir, tmp_path):
    encoders = Encoders()
    from_dir = load_candidate(str(tiny_model_dir), encoders)
    repo = Repository(tmp_path / "repo")
    repo.add_version(from_dir.tensors, model_source=str(tiny_model_dir))
    assert load_candidate(str(tmp_path / "repo"), encoders).sha256 == from_dir.sha256
    assert load_candidate(f"{tmp_path / 'repo'}@v1", encoders).sha256 == from_dir.sha256


def test_features_are_extracted_once(tiny_model_dir, toy_task_files, tmp_path, monkeypatch):
    encoders, store = Encoders(), Repository(tmp_path / "cache")
    body = load_candidate(str(tiny_model_dir), encoders)
    split = toy(toy_task_files, "sentiment").train.head(50)
    calls = []
    real = features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features", lambda *a: calls.append(1) or real(*a))
    first = features_module.frozen_features(store, body, encoders(body.source), split, 32, "mean")
    second = features_module.frozen_features(store, body, encoders(body.source), split, 32, "mean")
    assert len(calls) == 1 and first.values.shape == (50, 32)
    assert torch.equal(first.values, second.values) and second.seconds == first.seconds
    features_module.frozen_features(store, body, encoders(body.source), split, 32, "cls")  # another key
    assert len(calls) == 2


def test_a_blinded_body_ranks_below_the_intact_one_and_the_top_k_are_finetuned(tiny_model_dir, toy_task_files, tmp_path,
                                                                           settings):
    encoders = Encoders()
    intact = load_candidate(str(tiny_model_dir), encoders)
    blind = body_of("blinded", intact.source, blinded(tiny_model_dir))
    target = toy(toy_task_files, "sentiment")
    store = Repository(tmp_path / "cache")
    for by in ("probe", "logme"):
        ranked = rank_candidates(target, [blind, intact], settings, store, encoders, by=by)
        assert [r.name for r in ranked] == [intact.name, "blinded"]
        assert ranked[0].probe > 0.8 and ranked[1].probe < 0.7
        assert ranked[0].logme > ranked[1].logme
        assert all(r.finetune is None for r in ranked)
    ranked = rank_candidates(target, [blind, intact], settings, store, encoders, top_k=2, base=intact)
    by_name = {r.name: r for r in ranked}
    assert by_name[intact.name].gain == 0.0  # the base against itself, same seeds
    assert 0 <= by_name["blinded"].finetune <= 100 and by_name["blinded"].finetune_sd >= 0
    assert by_name["blinded"].gain == pytest.approx(by_name["blinded"].finetune - by_name[intact.name].finetune)


def test_sources_are_scored_and_intertraining_is_cached(tiny_model_dir, toy_task_files, tmp_path, settings):
    encoders, store = Encoders(), Repository(tmp_path / "cache")
    base = load_candidate(str(tiny_model_dir), encoders)
    target, source = toy(toy_task_files, "sentiment"), toy(toy_task_files, "topic")
    first = score_sources(target, [source], base, settings, store, encoders)
    count = lambda: {k: len(_computed(store, k)) for k in ("intertrained", "features")}  # noqa: E731
    before = count()
    again = score_sources(target, [source], base, settings, store, encoders)
    assert count() == before == {"intertrained": 1, "features": 4}  # base on both, intertrained on train + val
    (a,), (b,) = first, again
    assert (a.semb, a.logme, a.probe, a.body.sha256) == (b.semb, b.logme, b.probe, b.body.sha256)
    assert a.body.sha256 != base.sha256 and -1 <= a.semb <= 1 and 0 <= a.probe <= 1
    assert set(a.seconds) == {"intertrain", "source_features", "target_features", "semb", "features",
                              "validation_features", "logme", "probe"}
    with pytest.raises(Exception, match="differ from the target"):
        score_sources(target, [target], base, settings, store, encoders)


def _computed(store, kind):
    import sqlite3

    with sqlite3.connect(store.root / "index.sqlite") as db:
        return db.execute("SELECT key FROM computed WHERE kind = ?", (kind,)).fetchall()


def known_result() -> TargetResult:
    return TargetResult("t", baseline=[60.0], truth={"a": [80.0], "b": [70.0], "c": [60.0], "d": [50.0]},
                        scores={"semb": {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},  # exactly backwards
                                "logme": {"a": 4, "b": 3, "c": 2, "d": 1},  # exactly right
                                "probe": {"a": 0.2, "b": 0.9, "c": 0.1, "d": 0.3}},  # b, d, a, c
                        costs={("finetune", "a", "t"): 10.0, ("intertrain", "a", None): 5.0,
                               ("features", "a", "t"): 1.0, ("logme", "a", "t"): 0.5,
                               ("validation_features", "a", "t"): 0.25, ("probe", "a", "t"): 2.0})


def test_ranking_quality_of_each_method_known_answers():
    r = known_result()
    assert r.quality("logme") == {"regret@1": 0.0, "regret@3": 0.0, "lost@3": 0.0, "ndcg": 1.0, "spearman": 1.0}
    semb = r.quality("semb")  # top 1 = d (50), top 3 = d, c, b (best 70)
    assert semb["spearman"] == pytest.approx(-1.0)
    assert semb["regret@1"] == pytest.approx(30 / 80 * 100) and semb["regret@3"] == pytest.approx(10 / 80 * 100)
    assert semb["lost@3"] == 10.0
    probe = r.quality("probe")  # b, d, a, c
    assert probe["regret@1"] == pytest.approx(12.5) and probe["regret@3"] == 0.0
    assert probe["spearman"] == pytest.approx(0.0)  # ranks (truth, probe): a (3, 1), b (2, 3), c (1, 0), d (0, 2)


def test_random_order_quality_is_its_exact_expectation():
    """Regret@1: the mean (65) against 80. Regret@3: 3 of the 4 three-subsets hold a (80),
    one holds b at best (70): expected best 77.5. NDCG: the mean gain at every rank."""
    q = known_result().random_quality()
    assert q["regret@1"] == pytest.approx(15 / 80 * 100) and q["regret@3"] == pytest.approx(2.5 / 80 * 100)
    discounts = [1 / math.log2(k + 2) for k in range(4)]
    ideal = sum(g * d for g, d in zip([80, 70, 60, 50], discounts, strict=True))
    assert q["ndcg"] == pytest.approx(65 * sum(discounts) / ideal)


def test_summary_costs_each_method_by_the_work_it_needs():
    rows = {row["method"]: row for row in summarize([known_result()])}
    assert rows["logme"]["seconds"] == 1.5 and rows["logme"]["seconds_with_intertraining"] == 6.5
    assert rows["probe"]["seconds"] == 3.25
    assert rows["brute_force"]["seconds"] == 10.0 and rows["brute_force"]["seconds_with_intertraining"] == 15.0
    assert rows["logme"]["regret@3"] == 0.0 and rows["random"]["regret@1"] == pytest.approx(18.75)


def test_harness_measures_truth_for_every_source(tiny_model_dir, toy_task_files, tmp_path, settings):
    encoders, store = Encoders(), Repository(tmp_path / "cache")
    base = load_candidate(str(tiny_model_dir), encoders)
    target, source = toy(toy_task_files, "sentiment"), toy(toy_task_files, "topic")
    result = evaluate_target(target, [source], base, settings, store, encoders)
    assert len(result.baseline) == 2 and len(result.truth["topic"]) == 2
    assert all(0 <= acc <= 100 for acc in result.baseline + result.truth["topic"])
    assert ("finetune", "topic", "sentiment") in result.costs and ("intertrain", "topic", None) in result.costs
    finetunes = len(_computed(store, "finetune_score"))
    assert evaluate_target(target, [source], base, settings, store, encoders).truth == result.truth
    assert len(_computed(store, "finetune_score")) == finetunes == 4  # resumed from the cache, nothing redone


def write_settings(tmp_path):
    path = tmp_path / "selection.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_rank_command_end_to_end(tiny_model_dir, toy_task_files, tmp_path):
    repo = Repository(tmp_path / "repo")
    repo.add_version(blinded(tiny_model_dir), model_source=str(tiny_model_dir))
    args = ["rank", str(tiny_model_dir), f"{tmp_path / 'repo'}@v1", "--target", str(toy_task_files["sentiment"]),
            "--top-k", "1", "--base", str(tiny_model_dir), "--settings", str(write_settings(tmp_path)),
            "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "rows.jsonl")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["candidate"] for r in rows] == [str(tiny_model_dir), f"{tmp_path / 'repo'}@v1"]
    assert rows[0]["gain"] == 0.0 and rows[1]["finetune"] is None
    assert "candidates for" in result.output
    cached = len(_computed(Repository(tmp_path / "cache"), "features"))
    assert runner.invoke(app, args).exit_code == 0
    assert len(_computed(Repository(tmp_path / "cache"), "features")) == cached


def test_select_command_end_to_end(tiny_model_dir, toy_task_files, tmp_path):
    result = runner.invoke(app, [
        "select", "--target", str(toy_task_files["sentiment"]), "--sources", str(toy_task_files["topic"]),
        "--base", str(tiny_model_dir), "--by", "semb", "--settings", str(write_settings(tmp_path)),
        "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "rows.jsonl")])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["source"] == "topic" and set(row) >= {"probe", "logme", "semb", "seconds"}


@pytest.mark.parametrize("args, message", [
    (["rank", "default", "--target", "no_such_task"], "unknown task 'no_such_task'"),
    (["rank", "default", "--target", "sentiment", "--by", "vibes"], "rank by one of logme, probe"),
    (["select", "--target", "movie_sentiment", "--sources", "movie_sentiment"], "differ from the target"),
    (["select", "--target", "movie_sentiment", "--sources", "bbc_topic", "--by", "vibes"], "select by one of"),
])
def test_selection_commands_refuse_bad_input_clearly(args, message, tmp_path, toy_task_files):
    args = [str(toy_task_files["sentiment"]) if a == "sentiment" else a for a in args]
    result = runner.invoke(app, [*args, "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_a_version_that_is_not_there_is_named(tiny_model_dir, toy_task_files, tmp_path):
    Repository(tmp_path / "repo").add_version(blinded(tiny_model_dir), model_source=str(tiny_model_dir))
    result = runner.invoke(app, ["rank", f"{tmp_path / 'repo'}@v7", "--target", str(toy_task_files["sentiment"]),
                                 "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "no version 7" in result.output


def test_settings_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: []\nfeature_examples: 1\n")
    result = runner.invoke(app, ["rank", "default", "--target", "bbc_topic", "--settings", str(bad)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "bad.yaml" in out and "seeds" in out and "feature_examples" in out


def test_adapter_intertraining_trains_a_lora_adapter_that_the_target_finetune_continues(
        tiny_model_dir, toy_task_files, tmp_path, settings):
    from coldfusion.encodings.lora import attach_lora, load_lora_factors
    from coldfusion.models.encoder import Classifier
    from coldfusion.selection.transfer import intertrain

    adapters = SelectionSettings(**SMALL, intertraining="lora", lora={"r": 4, "alpha": 8.0, "lr": 1e-2})
    encoders, store = Encoders(), Repository(tmp_path / "cache")
    base = load_candidate(str(tiny_model_dir), encoders)
    target, source = toy(toy_task_files, "sentiment"), toy(toy_task_files, "topic")
    body, _ = intertrain(store, encoders(base.source), base, source, adapters)
    # the body is untouched where no adapter sits; adapted weights are W + (alpha / r) B A
    factors = body.adapter
    assert factors and all(v.shape[0] == 4 or v.shape[1] == 4 for v in factors.values())
    adapted = {k.removesuffix(".lora_A") for k in factors if k.endswith(".lora_A")}
    for key, value in base.tensors.items():
        if key in adapted:
            expected = value + 2.0 * factors[key + ".lora_B"] @ factors[key + ".lora_A"]
            assert torch.allclose(body.tensors[key], expected, atol=1e-6)
        else:
            assert torch.equal(body.tensors[key], value)
    assert any(not torch.equal(body.tensors[k], base.tensors[k]) for k in adapted)  # it learned
    assert body.adapter_base is base.tensors
    # the adapter loaded on the base computes what the folded body computes
    encoder = encoders(base.source)
    with_adapter = Classifier(encoder.new_body(base.tensors), 2)
    with_adapter.body = attach_lora(with_adapter.body, adapters.lora)
    load_lora_factors(with_adapter.body, factors)
    folded = Classifier(encoder.new_body(body.tensors), 2)
    batch = {"input_ids": torch.tensor([[2, 7, 9, 11, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    assert torch.allclose(with_adapter.eval().embed(**batch), folded.eval().embed(**batch), atol=1e-5)
    # the harness runs in adapter settings, cached apart from full intertraining
    lora_result = evaluate_target(target, [source], base, adapters, store, encoders)
    full_result = evaluate_target(target, [source], base, settings, store, encoders)
    assert len(_computed(store, "intertrained")) == 2 and len(_computed(store, "finetune_score")) == 8
    assert lora_result.truth != full_result.truth or lora_result.baseline != full_result.baseline
    assert all(0 <= acc <= 100 for acc in lora_result.baseline + lora_result.truth["topic"])


def test_select_command_in_adapter_settings(tiny_model_dir, toy_task_files, tmp_path):
    args = ["select", "--target", str(toy_task_files["sentiment"]), "--sources", str(toy_task_files["topic"]),
            "--base", str(tiny_model_dir), "--settings", str(write_settings(tmp_path)),
            "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "rows.jsonl")]
    result = runner.invoke(app, [*args, "--intertraining", "lora"])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["source"] == "topic" and row["seconds"]["intertrain"] > 0
    refused = runner.invoke(app, [*args, "--intertraining", "adapters"])
    assert refused.exit_code == 2 and "'full' or 'lora'" in refused.output


def test_harness_compare_sets_adapter_rankings_against_full_ones_on_the_same_pairs(tmp_path):
    """benchmarks/selection.py --parts compare: Regret@k from the pair rows, restricted to the
    adapter run's tasks; a full file that lacks those pairs is refused by name."""
    import subprocess
    import sys
    from pathlib import Path

    def pair(target, source, accuracy, semb):
        return {"part": "pair", "target": target, "source": source, "per_seed": [accuracy, accuracy],
                "semb": semb, "logme": semb, "probe": -semb}

    # full: a, b, c, d; target a's truth best is c; semb ranks d first
    full = [pair("a", "b", 60, 0.2), pair("a", "c", 80, 0.1), pair("a", "d", 70, 0.9), pair("a", "e", 99, 1.0),
            pair("b", "a", 50, 0.5), pair("b", "c", 40, 0.1), pair("b", "d", 45, 0.2)]
    adapter = [pair("a", "b", 60, 0.9), pair("a", "c", 80, 0.1), pair("a", "d", 70, 0.2),
               pair("b", "a", 50, 0.5), pair("b", "c", 40, 0.1), pair("b", "d", 45, 0.2)]
    (tmp_path / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full))
    (tmp_path / "lora.jsonl").write_text("".join(json.dumps(r) + "\n" for r in adapter))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "selection.py"
    out = subprocess.run([sys.executable, str(script), "--parts", "compare", "--out", str(tmp_path / "lora.jsonl"),
                          "--full", str(tmp_path / "full.jsonl")], capture_output=True, text=True, check=True)
    rows = {r["method"]: r for r in map(json.loads, out.stdout.splitlines()) if r["part"] == "compare"}
    # semb, target a: full picks d (70) of best 80 -> 12.5%; adapter picks b (60) -> 25%; target b: a is best both
    assert rows["semb"]["regret@1_full"] == pytest.approx(12.5 / 2)
    assert rows["semb"]["regret@1_lora"] == pytest.approx(25.0 / 2)
    assert rows["semb"]["targets"] == 2 and rows["semb"]["tasks"] == ["a", "b", "c", "d"]  # e left out
    (tmp_path / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:4]))
    refused = subprocess.run([sys.executable, str(script), "--parts", "compare", "--out", str(tmp_path / "lora.jsonl"),
                              "--full", str(tmp_path / "full.jsonl")], capture_output=True, text=True)
    assert refused.returncode != 0 and "lacks the pairs" in refused.stderr and "Traceback" not in refused.stderr
