"""The ColD Fusion loop: contributors finetune the base, the repository fuses, repeat.

    v0 = pretrained body                       (iteration 0: scored as the reference)
    for i in 1..T:
        contributors of iteration i each finetune v_{i-1} on their own task
        v_i = fuse(their bodies)               (the repository; only bodies are fused)
        every contributor scores v_i on its own task; the server scores it on its own suite

The loop runs on the repository's side and holds no contributor's data: the engine
(local, or Flower) reaches the contributors, who train and score where their data is and
send back bodies and numbers.

The run directory is the unit of resumption: `state.json` names the last finished
iteration and its version, `run-id` names the run for the nodes' heads (heads/ holds
them for the local engine and the simulation), and rows of `results.jsonl` past the last
finished iteration are dropped on resume.
"""

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from coldfusion.collab.attacks import poison_round
from coldfusion.collab.config import RunConfig, dump_config
from coldfusion.collab.local_engine import LocalEngine
from coldfusion.collab.report import write_report
from coldfusion.collab.round import EvaluationRound, RoundResult
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.faults import failpoint
from coldfusion.infra.progress import SilentProgress
from coldfusion.infra.runtime import Compute, derive_seed, seed_everything, use_compute
from coldfusion.io.checkpoint import Tensors, atomic_write_bytes
from coldfusion.io.results import ResultsLog
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository
from coldfusion.repository.intake import Refused
from coldfusion.tasks import load_task
from coldfusion.training.task_probe import TaskProbe


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


class ServerSuite:
    """The repository owner's own evaluation tasks (`evaluation.suite`), scored on the server.
    By default there are none: contributors score their own tasks."""

    def __init__(self, config: RunConfig, encoder: Encoder, compute: Compute):
        self.probes = [TaskProbe(load_task(spec), encoder, config.evaluation, config.max_length, config.pooling,
                                 compute.device, compute.dtype)
                       for spec in config.evaluation.suite]

    def num_examples(self) -> int:
        return sum(p.num_examples() for p in self.probes)

    def score(self, body: Tensors, progress) -> dict[str, dict]:
        return {p.task.name: p.score(body, progress.advance) for p in self.probes}


def run_id_of(run_dir: Path) -> str:
    """The run's identity, made when its directory is made: nodes keep their heads under it."""
    path = run_dir / "run-id"
    if not path.exists():
        atomic_write_bytes(path, secrets.token_hex(8).encode())
    return path.read_text().strip()


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> RunState | None:
    state = RunState.read(run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists() and state is None:  # an earlier attempt finished nothing: start over, with this config
        atomic_write_bytes(saved, dump_config(config).encode())
        return None
    if resume:
        if not saved.exists():
            raise ColdFusionError(f"nothing to resume in {run_dir}: no run was started there (drop --resume)")
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
    # A key the saved config lacks came with a newer version of coldfusion: its default holds.
    changed = {k for key in new.keys() & old.keys() for k in _changed_keys(old[key], new[key], f"{prefix}{key}.")}
    return changed | {f"{prefix}{key}" for key in old.keys() - new.keys()}


def run_cold_fusion(config: RunConfig, run_dir: Path | None = None, resume: bool = False,
                    progress=None, engine_for=None) -> Path:
    """Run (or resume) a ColD Fusion experiment; return its run directory.

    `engine_for(run_dir, run_id)` makes the engine that reaches the contributors (default:
    a LocalEngine over the config's tasks, heads under <run dir>/heads). An engine has
    `contributor_names`, `run_round(base, iteration, names, progress) -> RoundResult` and
    `evaluate(body, iteration, progress) -> EvaluationRound`.
    """
    progress = progress or SilentProgress()
    run_dir = Path(run_dir or config.output_dir / config.name)
    compute = use_compute(config)  # what this machine cannot do fails before anything is written
    state = _prepare_run_dir(config, run_dir, resume)
    run_id = run_id_of(run_dir)
    seed_everything(config.seed)
    repo = Repository(config.repository or run_dir / "repository")
    log = ResultsLog(run_dir / "results.jsonl")
    encoder = Encoder.load(config.model)
    if engine_for is None:  # one machine: the contributors' tasks are loaded here, by the engine only
        engine = LocalEngine(config, [load_task(spec) for spec in config.tasks], encoder, run_dir / "heads", run_id)
    else:
        engine = engine_for(run_dir, run_id)
    suite = ServerSuite(config, encoder, compute)
    progress.start_run(config.loop.iterations, state.completed_iterations if state else 0)

    def evaluation_rows(version: int, body: Tensors, iteration: int) -> list[dict]:
        evaluated = engine.evaluate(body, iteration, progress)
        own = EvaluationRound({})
        if suite.probes:
            progress.phase(f"iteration {iteration}: scoring the base on the server's suite", suite.num_examples())
            own = EvaluationRound(suite.score(body, progress))
        return (_probe_rows(repo, version, iteration, evaluated, config, "contributor")
                + _probe_rows(repo, version, iteration, own, config, "server"))

    # what an interrupted attempt stored past the last finished iteration is redone, not reused
    for item in repo.abandon_unfinished(run_id, state.completed_iterations if state else None):
        progress.log(f"abandoned {item} (the interrupted attempt's)")
    if state is None:  # iteration 0: store and score the pretrained base
        log.keep_until(-1)
        base = repo.add_version(encoder.pretrained, model_source=encoder.source, model_files=encoder.files_dir,
                                model_name=encoder.name, run=config.name, iteration=0, run_id=run_id)
        log.extend(evaluation_rows(base.id, encoder.pretrained, 0))
        state = RunState(completed_iterations=0, version=base.id)
        state.write(run_dir)
    else:
        log.keep_until(state.completed_iterations)
        progress.log(f"resuming {run_dir} after iteration {state.completed_iterations}")

    for iteration in range(state.completed_iterations + 1, config.loop.iterations + 1):
        chosen = _choose_contributors(engine.contributor_names, config, iteration)
        started = time.perf_counter()  # the iteration's wall time: contributors, fusion, probes
        base = repo.load_version(state.version)
        round_ = engine.run_round(base, iteration, chosen, progress)
        if config.attack:
            round_ = poison_round(round_, base, config.attack, config.seed, iteration)
        train_seconds = time.perf_counter() - started
        rows, version = _fuse_round(repo, config, state.version, iteration, round_, run_id)
        fusion_row = rows[-1]
        fusion_row["train_seconds"] = round(train_seconds, 2)
        if iteration % config.evaluation.every == 0 or iteration == config.loop.iterations:
            rows += evaluation_rows(version, repo.load_version(version), iteration)
        fusion_row["iteration_seconds"] = round(time.perf_counter() - started, 2)
        log.extend(rows)
        failpoint("loop.unrecorded")
        state = RunState(completed_iterations=iteration, version=version)
        state.write(run_dir)
        progress.iteration_done()

    write_report(run_dir)
    return run_dir


def _fuse_round(repo: Repository, config: RunConfig, base_version: int, iteration: int,
                round_: RoundResult, run_id: str) -> tuple[list[dict], int]:
    """Admit the contributions, fuse those admitted into a new version; return result rows and its id."""
    rows, ids, tasks, refused = [], [], [], {}
    for r in round_.results:
        try:
            c = repo.add_contribution(r.body, base_version=base_version, contributor=r.contributor, task=r.task,
                                      num_examples=r.num_examples, metrics=r.metrics, stats=r.stats,
                                      encoding=r.encoding, run_id=run_id, rules=config.fusion.validation)
        except Refused as exc:  # recorded in the index; the fusion row says why it is left out
            refused[r.task] = exc.reason
            continue
        ids.append(c.id)
        tasks.append(r.task)
        rows.append({"kind": "contribution", "iteration": iteration, "base_version": base_version,
                     "contribution": c.id, "task": r.task, "num_examples": r.num_examples,
                     "encoding": r.encoding["kind"], "bytes_sent": c.num_bytes, **r.metrics})
    if len(ids) < config.fusion.validation.min_accepted:
        reasons = "; ".join(f"{task}: {why}" for task, why in refused.items())
        raise ColdFusionError(f"iteration {iteration}: only {len(ids)} of {len(round_.results)} contributions were "
                              f"admitted, fewer than min_accepted = {config.fusion.validation.min_accepted}: {reasons}")
    started = time.perf_counter()
    version = repo.fuse(base_version, ids, method=config.fusion.method, params=config.fusion.params,
                        run=config.name, run_id=run_id, iteration=iteration, missing=round_.missing,
                        declined=round_.declined, validation=config.fusion.validation, outer=config.fusion.outer)
    task_of = {str(c): task for c, task in zip(ids, tasks, strict=True)}
    rejected = {**refused, **{task_of[c]: why for c, why in version.fusion.get("rejected", {}).items()}}
    fused = [task_of[str(c)] for c in version.fusion["contributions"]]
    sent = sum(row["bytes_sent"] for row in rows)
    rows.append({"kind": "fusion", "iteration": iteration, "version": version.id, "parent": base_version,
                 "method": config.fusion.method, "contributors": fused, "missing": round_.missing,
                 "declined": round_.declined, "rejected": rejected,
                 "fuse_seconds": round(time.perf_counter() - started, 2), "encoding": config.contribution.kind,
                 # what arrived (and is kept as it arrived), and that plus the new base: this iteration's disk use
                 "bytes_sent": sent, "bytes_stored": sent + repo.checkpoint_bytes(version.sha256)})
    return rows, version.id


def _choose_contributors(names: list[str], config: RunConfig, iteration: int) -> list[str]:
    k = config.loop.contributors_per_iteration
    if k is None or k >= len(names):
        return names
    rng = np.random.RandomState(derive_seed(config.seed, "sample", iteration))
    return [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]


def _probe_rows(repo: Repository, version: int, iteration: int, evaluated: EvaluationRound, config: RunConfig,
                scored_by: str) -> list[dict]:
    """A `probe` row per task scored (contributors' tasks in the run's order), an `unscored`
    row per contributor that sent no scores."""
    order = config.contributor_names + [t.name for t in config.evaluation.suite]
    rows = []
    for task in sorted(evaluated.scores, key=lambda t: order.index(t) if t in order else len(order)):
        values = evaluated.scores[task]
        summary = {k: v for k, v in values.items() if k != "test_correct"}  # the index keeps numbers only
        repo.record_metrics(version, task, "linear_probe", summary, run=config.name)
        rows.append({"kind": "probe", "iteration": iteration, "version": version, "task": task,
                     "protocol": "linear_probe", "split": "test", "scored_by": scored_by, **values})
    rows += [{"kind": "unscored", "iteration": iteration, "version": version, "task": task, "reason": why}
             for task, why in evaluated.missing.items()]
    return rows
