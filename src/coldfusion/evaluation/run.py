"""Evaluate bodies x tasks x protocols x seeds into one tidy results.jsonl, then report.

Rows already in results.jsonl are skipped, so an interrupted evaluation resumes where it
stopped (each row is written atomically as soon as it is measured).
"""

import time
from pathlib import Path

import yaml

from coldfusion.evaluation.config import BodySpec, EvalConfig
from coldfusion.evaluation.protocols import run_protocol
from coldfusion.evaluation.report import write_eval_report
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.progress import SilentProgress
from coldfusion.infra.runtime import precision_name, use_compute
from coldfusion.io.checkpoint import atomic_write_bytes
from coldfusion.io.results import ResultsLog
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository
from coldfusion.tasks import load_task
from coldfusion.training import encode


def resolve_body(spec: BodySpec, loaded: dict[str, Encoder]) -> tuple[Encoder, dict | None, str]:
    """(the encoder of its architecture and tokenizer, body tensors or None for the
    encoder's own, provenance). A repository version brings the model files stored with it;
    a model is loaded once (`loaded`: by name)."""
    if spec.model is not None:
        if spec.model not in loaded:
            loaded[spec.model] = Encoder.load(spec.model)
        return loaded[spec.model], None, spec.model
    repo_dir = Path(spec.repository)
    if not Repository.exists_at(repo_dir):
        raise ColdFusionError(f"body '{spec.name}': {repo_dir} is not a coldfusion repository (no index.sqlite)")
    repo = Repository(repo_dir, create=False)
    version = repo.resolve(spec.version)
    encoder = Encoder.from_repository(repo, version)
    return encoder, encoder.pretrained, f"{repo_dir} v{version.id} ({version.sha256[:12]})"


# What may change between runs into the same directory: more bodies, tasks, seeds or
# protocols add rows; anything else would mix rows measured under different settings.
EXTENSIBLE = {"name", "bodies", "tasks", "seeds", "protocols", "reference", "output_dir"}


def _check_same_settings(saved: Path, config: EvalConfig) -> None:
    if not saved.exists():
        return
    old, new = yaml.safe_load(saved.read_text()), config.model_dump(mode="json")
    # a setting added to coldfusion since those rows were measured counts as its default
    default = lambda k: EvalConfig.model_fields[k].default if k in EvalConfig.model_fields else None  # noqa: E731
    changed = sorted(k for k in (old.keys() | new.keys()) - EXTENSIBLE if old.get(k, default(k)) != new.get(k))
    if changed:
        raise ColdFusionError(f"{saved.parent} holds results measured with other settings of {changed}; "
                              "evaluate into a new directory (a new `name`), or restore those settings")


def _extended(saved: Path, config: EvalConfig) -> EvalConfig:
    """The directory's settings after this run: the bodies, tasks, seeds and protocols of earlier
    runs are kept beside this run's, so config.yaml and the report cover every row in
    results.jsonl, not only the last run's."""
    if not saved.exists():
        return config
    old = EvalConfig.model_validate(yaml.safe_load(saved.read_text()))

    def union(before, after, key=lambda x: x):
        merged = {key(x): x for x in before}
        merged.update({key(x): x for x in after})  # a re-specified entry keeps its place
        return list(merged.values())

    return config.model_copy(update={
        "bodies": union(old.bodies, config.bodies, lambda b: b.name),
        "tasks": union(old.tasks, config.tasks, lambda t: t.name),
        "seeds": union(old.seeds, config.seeds), "protocols": union(old.protocols, config.protocols),
        "reference": config.reference or old.reference_body})


def seeds_of(protocol: str, config: EvalConfig) -> list[int]:
    """A linear probe is deterministic (frozen features, L-BFGS from zeros): one seed says it all."""
    return config.seeds[:1] if protocol == "linear_probe" else config.seeds


def run_evaluation(config: EvalConfig, run_dir: Path | None = None, progress=None) -> Path:
    progress = progress or SilentProgress()
    compute = use_compute(config)
    loaded = {}
    bodies = {b.name: resolve_body(b, loaded) for b in config.bodies}
    run_dir = Path(run_dir or config.output_dir / config.name)
    _check_same_settings(run_dir / "config.yaml", config)
    extended = _extended(run_dir / "config.yaml", config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml",
                       yaml.safe_dump(extended.model_dump(mode="json"), sort_keys=False).encode())
    log = ResultsLog(run_dir / "results.jsonl")
    done = {(r["body"], r["task"], r["protocol"], r["seed"]) for r in log.rows()}
    todo = [(t, b, p, s) for t in config.tasks for b in bodies for p in config.protocols for s in seeds_of(p, config)
            if (b, t.name, p, s) not in done]
    progress.phase(f"evaluating ({len(todo)} runs)", len(todo))
    for spec in config.tasks:
        if not any(t is spec for t, *_ in todo):
            continue
        task = load_task(spec)
        if config.held_out == "validation":
            task = task.for_tuning(config.validation_examples or len(task.validation))
        splits_by_tokenizer = {}
        for body_name, (encoder, tensors, provenance) in bodies.items():
            source = encoder.source
            if source not in splits_by_tokenizer:  # tokenize each split once per tokenizer
                splits_by_tokenizer[source] = {
                    split: encode(getattr(task, split).head(n), encoder.tokenizer, config.max_length)
                    for split, n in (("train", config.train_examples), ("validation", config.validation_examples),
                                     ("test", config.test_examples))}
            splits = splits_by_tokenizer[source]
            for protocol in config.protocols:
                for seed in seeds_of(protocol, config):
                    if (body_name, task.name, protocol, seed) in done:
                        continue
                    start = time.perf_counter()
                    score = run_protocol(protocol, lambda e=encoder, t=tensors: e.new_body(t), task, splits, seed,
                                         config, encoder.tokenizer, config.max_length, config.pooling, compute)
                    log.extend([{
                        "body": body_name, "task": task.name, "protocol": protocol, "seed": seed,
                        **score.metrics, "n_test": len(score.correct), "seconds": round(time.perf_counter() - start, 2),
                        "source": provenance, "device": str(compute.device),
                        "precision": precision_name(compute.dtype), **score.details,
                        "test_correct": "".join("1" if c else "0" for c in score.correct)}])
                    progress.advance()
    write_eval_report(run_dir, extended)
    return run_dir
