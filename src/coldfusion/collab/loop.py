"""The ColD Fusion loop: contributors finetune the base, the repository fuses, repeat.

    v0 = pretrained body                       (iteration 0: scored as the reference)
    for i in 1..T:
        contributors of iteration i each finetune v_{i-1} on their own task
        v_i = fuse(their bodies)               (the repository; only bodies are fused)
        score v_i by linear probing on the seen tasks

The run directory is the unit of resumption: `state.json` names the last finished
iteration and its version, heads/ keeps each contributor's head, and rows of
`results.jsonl` past the last finished iteration are dropped on resume.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from coldfusion.checkpoint import atomic_write_bytes, load_tensors, save_tensors
from coldfusion.collab.contributor import Contributor
from coldfusion.collab.local_engine import LocalEngine
from coldfusion.config import RunConfig, dump_config
from coldfusion.encoder import Classifier, Encoder
from coldfusion.errors import ColdFusionError
from coldfusion.progress import SilentProgress
from coldfusion.repository import Repository
from coldfusion.runtime import derive_seed, seed_everything, set_threads
from coldfusion.tasks import Task, load_task
from coldfusion.training import encode
from coldfusion.training.probe import extract_features, probe_features


@dataclass
class RunState:
    completed_iterations: int
    version: int  # the current base version in the repository

    @classmethod
    def read(cls, run_dir: Path) -> "RunState | None":
        path = run_dir / "state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def write(self, run_dir: Path) -> None:
        atomic_write_bytes(run_dir / "state.json", json.dumps(self.__dict__).encode())


class ResultsLog:
    """results.jsonl: one JSON row per measurement; rewritten atomically, appended per iteration."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, iteration: int) -> None:
        kept = [r for r in self.rows() if r["iteration"] <= iteration]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def extend(self, rows: list[dict]) -> None:
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows() + rows).encode())


class SeenTaskProbe:
    """Scores a body by linear probing on each seen task (splits tokenized once)."""

    def __init__(self, tasks: list[Task], encoder: Encoder, config: RunConfig):
        ev = config.evaluation
        self.encoder, self.config = encoder, config
        self.data = {
            t.name: (t, {split: encode(getattr(t, split).head(n), encoder.tokenizer, config.max_length)
                         for split, n in (("train", ev.train_examples), ("validation", ev.validation_examples),
                                          ("test", ev.test_examples))})
            for t in tasks
        }

    def num_examples(self) -> int:
        return sum(len(d) for _, splits in self.data.values() for d in splits.values())

    def score(self, body_tensors, progress) -> dict[str, dict]:
        body = self.encoder.new_body(body_tensors)
        scores = {}
        for name, (task, splits) in self.data.items():
            model = Classifier(body, task.num_labels, pooling=self.config.pooling)
            feats = {}
            for split, data in splits.items():
                feats[split] = (extract_features(model, data, self.config.evaluation.probe.batch_size), data.labels)
                progress.advance(len(data))
            result = probe_features(feats["train"], feats["validation"], feats["test"], task.num_labels,
                                    self.config.evaluation.probe)
            scores[name] = {**result.test, "l2": result.l2, "validation_accuracy": result.validation_accuracy}
        return scores


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> RunState | None:
    state = RunState.read(run_dir)
    saved = run_dir / "config.yaml"
    if resume:
        if state is None:
            raise ColdFusionError(f"nothing to resume in {run_dir}: no finished iteration (start it without --resume)")
        changed = _changed_keys(yaml.safe_load(saved.read_text()), yaml.safe_load(dump_config(config)))
        changed.discard("loop.iterations")  # raising it is how a finished run is extended
        if changed:
            raise ColdFusionError(
                f"cannot resume {run_dir}: the config differs from the one it was started with in "
                f"{sorted(changed)}; resume with the original config, or start a new run (new `name`)")
        atomic_write_bytes(saved, dump_config(config).encode())
        return state
    if saved.exists():
        raise ColdFusionError(
            f"run directory {run_dir} already exists; resume it with --resume, or set a new `name`")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(saved, dump_config(config).encode())
    return None


def _changed_keys(old, new, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return set() if old == new else {prefix.rstrip(".")}
    return {k for key in old.keys() | new.keys()
            for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")}


def run_cold_fusion(config: RunConfig, run_dir: Path | None = None, resume: bool = False,
                    progress=None) -> Path:
    """Run (or resume) a ColD Fusion experiment; return its run directory."""
    progress = progress or SilentProgress()
    run_dir = Path(run_dir or config.output_dir / config.name)
    state = _prepare_run_dir(config, run_dir, resume)
    set_threads(config.threads)
    seed_everything(config.seed)
    repo = Repository(config.repository or run_dir / "repository")
    log = ResultsLog(run_dir / "results.jsonl")
    encoder = Encoder.load(config.model)
    tasks = [load_task(spec) for spec in config.tasks]
    heads_dir = run_dir / "heads" / f"iter{state.completed_iterations if state else 0:03d}"
    contributors = [
        Contributor(t, encoder, finetune_settings=config.finetune, max_length=config.max_length,
                    pooling=config.pooling, examples_per_iteration=config.loop.examples_per_contributor,
                    validation_examples=config.loop.validation_examples, keep_head=config.loop.keep_head,
                    seed=config.seed,
                    head=load_tensors(heads_dir / f"{t.name}.safetensors")
                    if (heads_dir / f"{t.name}.safetensors").exists() else None)
        for t in tasks
    ]
    probe = SeenTaskProbe(tasks, encoder, config)
    engine = LocalEngine()
    progress.start_run(config.loop.iterations, state.completed_iterations if state else 0)

    if state is None:  # iteration 0: store and score the pretrained base
        base = repo.add_version(encoder.pretrained, model_source=encoder.source, run=config.name, iteration=0)
        progress.phase("probing the pretrained base", probe.num_examples())
        log.extend(_probe_rows(repo, base.id, 0, probe.score(encoder.pretrained, progress), config.name))
        state = RunState(completed_iterations=0, version=base.id)
        state.write(run_dir)
    else:
        log.keep_until(state.completed_iterations)
        progress.log(f"resuming {run_dir} after iteration {state.completed_iterations}")

    for iteration in range(state.completed_iterations + 1, config.loop.iterations + 1):
        base_tensors = repo.load_version(state.version)
        chosen = _choose_contributors(contributors, config, iteration)
        total = sum(len(c.examples_for(iteration)) for c in chosen)
        progress.phase(f"iteration {iteration}: finetuning {len(chosen)} contributors", total)
        started = time.perf_counter()
        results = engine.run_round(chosen, base_tensors, iteration, on_step=progress.advance)
        rows = []
        contribution_ids = []
        for r in results:
            c = repo.add_contribution(r.body, base_version=state.version, contributor=r.contributor,
                                      task=r.task, num_examples=r.num_examples, metrics=r.metrics)
            contribution_ids.append(c.id)
            rows.append({"kind": "contribution", "iteration": iteration, "base_version": state.version,
                         "contribution": c.id, "task": r.task, "num_examples": r.num_examples, **r.metrics})
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        version = repo.fuse(state.version, contribution_ids, method=config.fusion.method,
                            params=config.fusion.params, run=config.name, iteration=iteration)
        rows.append({"kind": "fusion", "iteration": iteration, "version": version.id, "parent": state.version,
                     "method": config.fusion.method, "contributors": [r.task for r in results],
                     "train_seconds": round(train_seconds, 2),
                     "fuse_seconds": round(time.perf_counter() - started, 2)})
        progress.phase(f"iteration {iteration}: probing the fused base", probe.num_examples())
        rows += _probe_rows(repo, version.id, iteration, probe.score(repo.load_version(version.id), progress),
                            config.name)
        # Heads are contributor state: snapshot them per iteration, so a crash before
        # state.json is written resumes with the heads of the last finished iteration.
        for c in contributors:
            if c.head is not None:
                save_tensors(run_dir / "heads" / f"iter{iteration:03d}" / f"{c.name}.safetensors", c.head)
        log.extend(rows)
        state = RunState(completed_iterations=iteration, version=version.id)
        state.write(run_dir)
        progress.iteration_done()

    from coldfusion.report import write_report

    write_report(run_dir)
    return run_dir


def _choose_contributors(contributors: list[Contributor], config: RunConfig, iteration: int) -> list[Contributor]:
    k = config.loop.contributors_per_iteration
    if k is None or k >= len(contributors):
        return contributors
    rng = np.random.RandomState(derive_seed(config.seed, "sample", iteration))
    return [contributors[i] for i in sorted(rng.choice(len(contributors), size=k, replace=False))]


def _probe_rows(repo: Repository, version: int, iteration: int, scores: dict, run: str) -> list[dict]:
    rows = []
    for task, values in scores.items():
        repo.record_metrics(version, task, "linear_probe", values, run=run)
        rows.append({"kind": "probe", "iteration": iteration, "version": version, "task": task,
                     "protocol": "linear_probe", "split": "test", **values})
    return rows
