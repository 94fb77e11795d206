"""The publication-scale configs (configs/paper): in sync with their generator, valid, and
shaped as the publication's setup (RoBERTa-base, 30 iterations, 8 of the seen datasets per
iteration, batch 256, lr 5e-5, 3 folds in which every dataset is unseen exactly once)."""

import importlib.util
from pathlib import Path

import yaml

from coldfusion.collab.config import load_config
from coldfusion.evaluation.config import load_eval_config

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


def _generator():
    spec = importlib.util.spec_from_file_location("make_folds", PAPER / "make_folds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_configs_are_what_the_generator_writes():
    for name, text in _generator().rendered().items():
        assert (PAPER / name).read_text() == text, f"{name} is stale: run python configs/paper/make_folds.py"


def test_the_folds_follow_the_publication():
    datasets = {d["name"] for d in yaml.safe_load((PAPER / "datasets.yaml").read_text())["datasets"]}
    unseen_count = dict.fromkeys(datasets, 0)
    for k in (1, 2, 3):
        run = load_config(PAPER / f"fold{k}.yaml")
        assert run.model == "FacebookAI/roberta-base" and run.loop.iterations == 30
        assert run.loop.contributors_per_iteration == 8
        assert run.finetune.batch_size == 256 and run.finetune.lr == 5e-5 and run.fusion.method == "average"
        assert (run.device, run.precision, run.threads) == ("auto", "auto", "auto")
        seen = {t.name for t in run.tasks}
        assert all(t.hf_dataset for t in run.tasks)  # every one from the hub
        unseen = load_eval_config(PAPER / f"fold{k}-unseen.yaml")
        assert {t.name for t in unseen.tasks} == datasets - seen
        assert set(unseen.protocols) == {"finetune", "few_shot"} and len(unseen.seeds) == 5
        assert {t.name for t in load_eval_config(PAPER / f"fold{k}-seen.yaml").tasks} == seen
        assert [b.repository for b in unseen.bodies if b.repository] == [Path(f"runs/paper-fold{k}/repository")]
        for name in datasets - seen:
            unseen_count[name] += 1
        assert len(seen) >= 2 * len(datasets) // 3 - 1
    assert set(unseen_count.values()) == {1}
