"""`coldfusion multitask`: the multitask baseline as a run, its body stored in a repository
like any ColD Fusion base (so `coldfusion evaluate` scores both the same way). With
`model: ca_mtl` the body trains inside CA-MTL's task conditioning; the body is stored the
same way and the conditioning beside it, in the run directory (`ca_mtl.safetensors`)."""

import json
from pathlib import Path

import yaml

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.progress import SilentProgress
from coldfusion.infra.runtime import derive_seed, seed_everything, use_compute
from coldfusion.io.checkpoint import atomic_write_bytes, save_tensors
from coldfusion.io.results import ResultsLog
from coldfusion.models.ca_mtl import CaMtlEncoder, parameter_count
from coldfusion.models.encoder import Classifier, Encoder, body_tensors
from coldfusion.multitask.config import MultitaskConfig
from coldfusion.multitask.train import train_multitask
from coldfusion.repository import Repository
from coldfusion.tasks import load_task
from coldfusion.training import encode


def run_multitask(config: MultitaskConfig, run_dir: Path | None = None, progress=None) -> Path:
    """Train the multitask body; store it as a repository version; write the run directory."""
    progress = progress or SilentProgress()
    compute = use_compute(config)  # what this machine cannot do fails before anything is written
    run_dir = Path(run_dir or config.output_dir / config.name)
    if (run_dir / "state.json").exists():
        raise ColdFusionError(f"{run_dir} already holds a finished multitask run; set a new `name`")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml",
                       yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
    seed_everything(config.seed)
    tasks = [load_task(spec) for spec in config.tasks]
    encoder = Encoder.load(config.model)
    body = encoder.new_body()
    s = config.multitask
    conditioned = None
    if s.model == "ca_mtl":
        seed_everything(derive_seed(config.seed, "ca_mtl"))
        conditioned = CaMtlEncoder(body, len(tasks), config.max_length, **s.ca_mtl.model_dump())
    heads = {}
    for i, t in enumerate(tasks):  # each head initialised from its own seed: the same whatever the task order
        seed_everything(derive_seed(config.seed, "head", t.name))
        shared = conditioned.for_task(i) if conditioned else body
        heads[t.name] = Classifier(shared, t.num_labels, pooling=config.pooling).place(compute.device, compute.dtype)
    trained = [*(conditioned.conditioning() if conditioned else []), body, *(h.head for h in heads.values())]
    train = {t.name: encode(t.train.head(config.train_examples), encoder.tokenizer, config.max_length) for t in tasks}
    validation = {t.name: encode(t.validation.head(config.validation_examples), encoder.tokenizer, config.max_length)
                  for t in tasks}
    progress.phase(f"multitask training ({s.sampler} sampler, {s.steps} steps)", s.steps * s.optimizer.batch_size)
    result = train_multitask(body, heads, train, validation, s, seed=derive_seed(config.seed, "multitask"),
                             on_step=progress.advance, new_modules=conditioned.conditioning() if conditioned else None)
    extra = {}
    if conditioned is not None:  # the per-task conditioning, beside the body (tasks in this order)
        save_tensors(run_dir / "ca_mtl.safetensors", conditioned.conditioning_state(),
                     {"tasks": json.dumps([t.name for t in tasks]), "settings": s.ca_mtl.model_dump_json()})
        extra = {"conditioning": "ca_mtl.safetensors", "tasks": [t.name for t in tasks]}
    repo = Repository(config.repository or run_dir / "repository")
    version = repo.add_version(
        body_tensors(body), model_source=encoder.source, model_files=encoder.files_dir, model_name=encoder.name,
        run=config.name,
        fusion={"method": "multitask", "model": s.model, "sampler": s.sampler, "sampler_params": s.sampler_params,
                "steps": s.steps, "examples": result.examples_seen})
    rows = [{"kind": "step", **row} for row in result.history]
    rows.append({"kind": "summary", "version": version.id, "sha256": version.sha256, "steps": result.steps,
                 "examples_seen": result.examples_seen, "examples_per_task": result.examples_per_task,
                 "seconds": round(result.seconds, 1), "model": s.model,
                 "trainable_params": parameter_count(trained), **extra})
    ResultsLog(run_dir / "results.jsonl").extend(rows)
    share = {t: n / max(result.examples_seen, 1) for t, n in result.examples_per_task.items()}
    lines = "\n".join(f"| {t} | {len(train[t])} | {n} | {100 * share[t]:.1f}% |"
                      for t, n in result.examples_per_task.items())
    atomic_write_bytes(run_dir / "summary.md", (
        f"# Multitask baseline: {config.name}\n\n{'CA-MTL, ' if conditioned else ''}{s.sampler} sampler, "
        f"{s.steps} steps, "
        f"{result.examples_seen} examples in {result.seconds:.0f} s. Body stored as version v{version.id} "
        f"({version.sha256[:12]}) of {repo.root}.\n\n| task | train examples | examples trained on | share |\n"
        f"|---|---:|---:|---:|\n{lines}\n").encode())
    state = {"version": version.id, "repository": str(repo.root), **extra}
    atomic_write_bytes(run_dir / "state.json", json.dumps(state).encode())
    return run_dir
