"""One of four contributors is poisoned every iteration: plain averaging collapses, the
defences keep the fused base's linear-probe accuracy within a point of the clean run.

Tiny encoder, toy tasks: the mechanism, in seconds. The same on the real MiniLM and real
tasks, for every attack and aggregator, is benchmarks/reliability.py.
"""

import json

import pandas as pd
import pytest
from conftest import make_sentiment_rows, make_topic_rows

from coldfusion.collab import run_cold_fusion
from coldfusion.collab.attacks import poisoned_update
from coldfusion.collab.config import parse_config


@pytest.fixture(scope="module")
def four_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("four-tasks")
    tasks = {"sentiment": make_sentiment_rows(400, seed=1), "topic": make_topic_rows(450, seed=2),
             "sentiment_b": make_sentiment_rows(400, seed=3), "topic_b": make_topic_rows(450, seed=4)}
    for name, rows in tasks.items():
        pd.DataFrame(rows).to_csv(root / f"{name}.csv", index=False)
    return {name: root / f"{name}.csv" for name in tasks}


def final_accuracy(tiny_model_dir, tasks, tmp_path, name, fusion, attack=None):
    config = parse_config({
        "name": name, "model": str(tiny_model_dir), "max_length": 32, "threads": 1,
        "tasks": [{"name": n, "path": str(p)} for n, p in tasks.items()],
        "loop": {"iterations": 2, "examples_per_contributor": 96, "validation_examples": 40},
        "finetune": {"batch_size": 16, "lr": 1e-3, "head_lr": 5e-3},
        "evaluation": {"train_examples": 120, "validation_examples": 40, "test_examples": 120,
                       "probe": {"l2_grid": [1e-3], "max_iter": 50}},
        "fusion": fusion, "attack": attack, "output_dir": str(tmp_path),
    })
    run_dir = run_cold_fusion(config)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    probes = [r["accuracy"] for r in rows if r["kind"] == "probe" and r["iteration"] == 2]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    return 100 * sum(probes) / len(probes), fusions


def test_defences_hold_against_a_poisoned_contributor(tiny_model_dir, four_tasks, tmp_path):
    # Keyword features survive a attack or sign-flipped update of this tiny encoder (92% after
    # x100); large random noise does not.
    attack = {"contributors": ["topic_b"], "kind": "random", "factor": 1000}
    off = {"validation": {"outlier_factor": None, "base_norm_factor": None}}  # admission's norm rules off
    clean, _ = final_accuracy(tiny_model_dir, four_tasks, tmp_path, "clean", {"method": "average"})
    collapsed, _ = final_accuracy(tiny_model_dir, four_tasks, tmp_path, "avg", {"method": "average", **off}, attack)
    assert collapsed < clean - 20  # the plain average follows the attacker
    validated, fusions = final_accuracy(tiny_model_dir, four_tasks, tmp_path, "validated", {"method": "average"},
                                        attack)
    assert all(list(f["rejected"]) == ["topic_b"] for f in fusions)  # refused every iteration, with its reason
    assert all("the base's own norm" in f["rejected"]["topic_b"] for f in fusions)  # x1000: beyond the base itself
    summary = " ".join((tmp_path / "validated" / "summary.md").read_text().split())
    assert "**Left out:**" in summary and "- iteration 2: topic_b refused: against version 2: delta norm" in summary
    defended = {"validation": validated}
    for method, params in [("median", {}), ("trimmed_mean", {"trim": 0.25}), ("norm_clipping", {})]:
        defended[method], _ = final_accuracy(tiny_model_dir, four_tasks, tmp_path, method,
                                             {"method": method, "params": params, **off}, attack)
    far = {k: round(v, 1) for k, v in defended.items() if abs(v - clean) > 1.0}
    assert not far, f"clean {clean:.1f}, average under attack {collapsed:.1f}, off by more than 1: {far}"


def test_attacks_known_answers():
    import torch

    base = {"w": torch.zeros(4), "ids": torch.arange(3)}
    body = {"w": torch.tensor([1.0, 0.0, -2.0, 0.0]), "ids": torch.arange(3)}
    assert torch.equal(poisoned_update(body, base, "scale", 3.0, 0)["w"], torch.tensor([3.0, 0.0, -6.0, 0.0]))
    assert torch.equal(poisoned_update(body, base, "sign_flip", 1.0, 0)["w"], torch.tensor([-1.0, 0.0, 2.0, 0.0]))
    noise = poisoned_update(body, base, "random", 2.0, 0)["w"]
    assert noise.norm().item() == pytest.approx(2 * 5 ** 0.5, rel=1e-5)  # factor x the honest delta's norm
    assert torch.equal(noise, poisoned_update(body, base, "random", 2.0, 0)["w"])  # seeded
    assert torch.equal(poisoned_update(body, base, "random", 2.0, 0)["ids"], torch.arange(3))


def test_attackers_must_be_contributors(tiny_model_dir, four_tasks):
    from coldfusion.infra.errors import ColdFusionError

    with pytest.raises(ColdFusionError, match=r"attack.contributors \['nobody'\] are not among the contributors"):
        parse_config({"model": str(tiny_model_dir), "tasks": [{"name": "t", "path": str(four_tasks["topic"])}],
                      "attack": {"contributors": ["nobody"]}})


@pytest.mark.slow
def test_real_tasks_one_poisoned_contributor(tmp_path):
    """The bundled MiniLM on three real tasks, one contributor sending large random noise
    (an honest update's norm is about 0.5, the weights' about 280, so x1000): the plain
    average collapses; validation and the median lose at most a point against clean (they
    fuse fewer honest updates, which may also score higher)."""
    def run(name, fusion, attack=None):
        config = parse_config({
            "name": name, "model": "default", "max_length": 48,
            "tasks": ["election_tweets", "tweet_sentiment", "movie_sentiment"],
            "loop": {"iterations": 1, "examples_per_contributor": 96, "validation_examples": 32},
            "finetune": {"batch_size": 16},
            "evaluation": {"train_examples": 150, "validation_examples": 100, "test_examples": 200},
            "fusion": fusion, "attack": attack, "output_dir": str(tmp_path),
        })
        rows = [json.loads(line) for line in (run_cold_fusion(config) / "results.jsonl").read_text().splitlines()]
        return 100 * sum(r["accuracy"] for r in rows if r["kind"] == "probe" and r["iteration"] == 1) / 3

    attack = {"contributors": ["tweet_sentiment"], "kind": "random", "factor": 1000}
    off = {"validation": {"outlier_factor": None, "base_norm_factor": None}}  # admission's norm rules off
    clean = run("clean", {"method": "average"})
    collapsed = run("average", {"method": "average", **off}, attack)
    validated = run("validated", {"method": "average"}, attack)
    median = run("median", {"method": "median", **off}, attack)
    assert collapsed < clean - 10, (clean, collapsed)
    assert validated >= clean - 1.0 and median >= clean - 1.0, (clean, validated, median)
