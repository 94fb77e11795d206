"""The ColD Fusion benchmark, in the publication's protocol: is the fused base a better
starting point for tasks it never saw, and how does it compare with multitask learning?

From configs/benchmark.yaml:

1. Folds: each fold's unseen tasks are held out; the other tasks are its seen tasks (every
   task is unseen exactly once). Per fold, one `coldfusion run` per variant (k of n
   contributors sampled each iteration) and one `coldfusion multitask` on the same seen
   data with the same number of training examples.
2. Choice on validation only: every variant and the pretrained base are scored on the
   validation splits (`held_out: validation`): few-shot on the unseen tasks (100 examples
   per task, stratified) and a linear probe on the seen tasks. The variant with the highest
   mean of the two averages is chosen. The multitask body is scored the same way, beside
   them (not a candidate).
3. Test, once, at the end: pretrained / chosen ColD Fusion / multitask, a linear probe on
   the seen tasks, few-shot (100 per task, and 100 per class) on the unseen tasks, and a
   linear probe of every `plot_every`-th version of the chosen run on the seen and unseen
   tasks (the plot).
4. report.md (the publication's Table 1: a row per task, averages, paired gains with 95%
   bootstrap intervals over seeds and test examples, share of tasks above the base),
   summary.json, plots/iterations.png.

Two single-threaded workers take the next step whose inputs exist. Every step resumes:
rerun the script to continue. `--quick` checks the pipeline on a few dozen examples.
Prints JSON lines.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from coldfusion.evaluation.report import protocol_table  # noqa: E402
from coldfusion.io.results import ResultsLog  # noqa: E402
from coldfusion.repository import Repository  # noqa: E402

FINAL = ["pretrained", "coldfusion", "multitask"]  # the bodies reported on test


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def shrink(bench: dict) -> dict:
    """--quick: the same pipeline on a few dozen examples, two tasks per fold."""
    bench = json.loads(json.dumps(bench))
    bench["folds"] = [fold[:2] for fold in bench["folds"]]
    bench["coldfusion"].update(iterations=2, examples_per_contributor=32, contributors_per_iteration=1, probe_every=1)
    names = list(bench["variants"])
    bench["variants"] = {n: bench["variants"][n] for n in (names[0], names[-1])}
    for variant in bench["variants"].values():  # fewer, longer rounds keep the shrunk budget
        if "loop" in (variant or {}):
            variant["loop"] = {"iterations": 1, "examples_per_contributor": 64}
    ev = bench["evaluation"]
    ev.update(seeds=ev["seeds"][:2], train_examples=48, validation_examples=32, test_examples=48)
    for key in ("few_shot", "few_shot_per_class"):
        ev[key].update(k=8)
        ev[key]["finetune"]["epochs"] = 1
    return bench


@dataclass(frozen=True)
class Fold:
    index: int
    seen: list[str]
    unseen: list[str]

    @property
    def name(self) -> str:
        return f"fold{self.index}"


def folds_of(bench: dict) -> list[Fold]:
    tasks = [t for fold in bench["folds"] for t in fold]
    if len(set(tasks)) != len(tasks):
        raise SystemExit("configs: a task is unseen in more than one fold")
    return [Fold(i, [t for t in tasks if t not in fold], list(fold)) for i, fold in enumerate(bench["folds"])]


class Plan:
    """Every config of the benchmark, and where its results go."""

    def __init__(self, bench: dict, out: Path):
        self.bench, self.out, self.folds = bench, out, folds_of(bench)
        self.common = {"model": bench["model"], "max_length": bench["max_length"], "seed": bench["seed"],
                       "threads": 1, "precision": bench.get("precision", "auto")}
        for variant in bench["variants"]:  # the multitask baseline matches one budget
            loop = self.coldfusion_run(self.folds[0], variant)["loop"]
            examples = loop["iterations"] * loop["contributors_per_iteration"] * loop["examples_per_contributor"]
            if examples != self.budget():
                raise SystemExit(f"configs: variant {variant} trains on another number of examples than "
                                 f"{self.budget()}, the multitask baseline's budget; change its loop to match")

    def run_dir(self, fold: Fold, name: str) -> Path:
        return self.out / "runs" / fold.name / name

    def coldfusion_run(self, fold: Fold, variant: str) -> dict:
        cf, ev = self.bench["coldfusion"], self.bench["evaluation"]
        run = {**self.common, "name": variant, "tasks": fold.seen, "output_dir": str(self.out / "runs" / fold.name),
               "loop": {"iterations": cf["iterations"], "examples_per_contributor": cf["examples_per_contributor"],
                        "contributors_per_iteration": cf["contributors_per_iteration"]},
               "finetune": self.bench["finetune"], "fusion": cf.get("fusion", {"method": "average"}),
               "evaluation": {"every": cf.get("probe_every", 1), "probe": ev["probe"],
                              **{k: ev[k] for k in ("train_examples", "validation_examples", "test_examples")}}}
        return merge(run, self.bench["variants"][variant] or {})

    def budget(self) -> int:
        cf = self.bench["coldfusion"]
        return cf["iterations"] * cf["contributors_per_iteration"] * cf["examples_per_contributor"]

    def multitask_run(self, fold: Fold) -> dict:
        ft = self.bench["finetune"]
        steps = max(1, self.budget() // ft["batch_size"])  # the same number of training examples
        return {**self.common, "name": "multitask", "tasks": fold.seen,
                "output_dir": str(self.out / "runs" / fold.name),
                "multitask": {**self.bench["multitask"], "steps": steps,
                              "optimizer": {k: v for k, v in ft.items() if k != "epochs"}}}

    def body(self, fold: Fold, name: str) -> dict:
        """`pretrained`, `multitask` or a variant's name (its final base)."""
        if name == "pretrained":
            return {"name": name, "model": self.bench["model"]}
        return {"name": name, "repository": str(self.run_dir(fold, name) / "repository")}

    def evaluation(self, name: str, tasks: list[str], protocol: str, bodies: list[dict], held_out: str,
                   few_shot: str = "few_shot") -> dict:
        ev = self.bench["evaluation"]
        return {"name": name, "max_length": self.bench["max_length"], "threads": 1,
                "precision": self.common["precision"], "seeds": ev["seeds"] if protocol != "linear_probe" else [0],
                "bodies": bodies, "reference": None, "tasks": tasks, "protocols": [protocol], "held_out": held_out,
                "probe": ev["probe"], "few_shot": ev[few_shot], "output_dir": str(self.out / "evaluations"),
                **{k: ev[k] for k in ("train_examples", "validation_examples", "test_examples")}}

    def rows(self, name: str) -> list[dict]:
        return ResultsLog(self.out / "evaluations" / name / "results.jsonl").rows()

    def missing(self, config: dict) -> list[dict]:
        """The bodies of an evaluation config that still lack a row: a finished evaluation is
        not rerun, and needs no body (a fresh clone has the rows but not the runs)."""
        seeds = config["seeds"]
        done = {(r["body"], r["task"], r["protocol"], r["seed"]) for r in self.rows(config["name"])}
        return [b for b in config["bodies"] if any((b["name"], t, p, s) not in done for t in config["tasks"]
                                                   for p in config["protocols"] for s in seeds)]

    def probe_rows(self, fold: Fold, variant: str) -> list[dict]:
        """A run's probe rows (the contributors' scores of its first and last base) and fusion rows
        (its timings), kept beside the evaluations: the run directory itself is too large to commit."""
        kept = self.out / "probes" / f"{fold.name}-{variant}.jsonl"
        run = self.run_dir(fold, variant) / "results.jsonl"
        if run.exists():
            rows = [r for r in ResultsLog(run).rows() if r.get("kind") in ("probe", "fusion")]
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "test_correct"}) + "\n"
                                    for r in rows))
        return ResultsLog(kept).rows() if kept.exists() else []


# -- choosing the variant (validation only) ------------------------------------------------


def validation_steps(plan: Plan, fold: Fold, body: str) -> list[tuple[str, dict]]:
    spec = plan.body(fold, body)
    return [(f"val-{fold.name}-unseen-{body}",
             plan.evaluation(f"val-{fold.name}-unseen-{body}", fold.unseen, "few_shot", [spec], "validation")),
            (f"val-{fold.name}-seen-{body}",
             plan.evaluation(f"val-{fold.name}-seen-{body}", fold.seen, "linear_probe", [spec], "validation"))]


def validation_scores(plan: Plan) -> dict[str, dict[str, float]]:
    """Per body (pretrained, each variant, multitask): mean validation accuracy of the unseen few-shot
    and of the seen linear probe, over all folds' tasks, and their mean (the criterion)."""
    scores = {}
    for body in ["pretrained", *plan.bench["variants"], "multitask"]:
        part = {}
        for group in ("unseen", "seen"):  # few-shot on the unseen tasks, linear probe on the seen ones
            rows = [r for f in plan.folds for r in plan.rows(f"val-{f.name}-{group}-{body}")]
            by_task: dict[str, list[float]] = {}
            for r in rows:
                by_task.setdefault(r["task"], []).append(r["accuracy"])
            part[group] = sum(sum(v) / len(v) for v in by_task.values()) / max(1, len(by_task))
        scores[body] = {**part, "criterion": (part["unseen"] + part["seen"]) / 2}
    return scores


def chosen_variant(plan: Plan) -> str:
    scores = validation_scores(plan)
    return max(plan.bench["variants"], key=lambda v: scores[v]["criterion"])


# -- the queue -----------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    args: Callable[[], list[str] | None]  # built when the step starts (it may need what earlier steps made); None: done
    needs: tuple[str, ...] = ()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _call(name: str, cmd: list[str], out: Path) -> str | None:
    log = out / "logs" / f"{name}.log"
    with open(log, "a") as f:
        if subprocess.call([sys.executable, "-m", "coldfusion", *cmd], stdout=f, stderr=subprocess.STDOUT, env=_env()):
            return f"{name} failed: see {log}"
    return None


def run_queue(steps: list[Step], out: Path, workers: int = 2) -> None:
    """Run steps on `workers` single-threaded processes: each free worker takes the first
    step whose needs are done, so nothing waits on a fixed phase. Stops at the first failure."""
    done, taken, failures = set(), set(), []
    lock = threading.Condition()

    def next_step() -> Step | None:
        with lock:
            while True:
                pending = [s for s in steps if s.name not in taken]
                if failures or not pending:
                    return None
                ready = next((s for s in pending if set(s.needs) <= done), None)
                if ready:
                    taken.add(ready.name)
                    return ready
                lock.wait()

    def worker() -> None:
        while (step := next_step()) is not None:
            started = time.perf_counter()
            args = step.args()
            failure = _call(step.name, args, out) if args is not None else None
            with lock:
                failures.extend([failure] if failure else [])
                done.add(step.name)
                lock.notify_all()
            print(json.dumps({"kind": "step", "step": step.name, "failed": bool(failure), "ran": args is not None,
                              "minutes": round((time.perf_counter() - started) / 60, 2)}), flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit("; ".join(failures))


def timed(queue: list[Step] | None, out: Path) -> float:
    """Run the queue (None: nothing) and log its wall time; the minutes of every invocation so
    far (one row each in benchmark.jsonl: a benchmark run in parts adds up)."""
    log = out / "benchmark.jsonl"
    earlier = sum(json.loads(line)["minutes"] for line in log.read_text().splitlines()) if log.exists() else 0.0
    if queue is None:
        return earlier
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        run_queue(queue, out)
    finally:
        minutes = (time.perf_counter() - start) / 60
        with open(log, "a") as f:
            f.write(json.dumps({"kind": "invocation", "minutes": round(minutes, 2)}) + "\n")
    return earlier + minutes


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def steps(plan: Plan) -> list[Step]:
    """Training first (multitask last: it is needed only at the end), the validation scores
    as soon as their body exists, then the test evaluations once the variant is chosen.
    What is already measured is skipped, and so is training that nothing left needs."""
    configs = plan.out / "configs"

    def run_args(fold: Fold, name: str) -> list[str]:
        path = write(configs / f"{fold.name}-{name}.yaml", plan.coldfusion_run(fold, name))
        return ["run", str(path), *(["--resume"] if (plan.run_dir(fold, name) / "config.yaml").exists() else [])]

    def needed(configs_: list[Callable[[], dict]]) -> bool:
        return any(plan.missing(c()) for c in configs_)

    def evaluate(name: str, config: Callable[[], dict], needs: tuple[str, ...]) -> Step:
        def args() -> list[str] | None:
            full = config()
            todo = plan.missing(full)
            return ["evaluate", str(write(configs / f"{name}.yaml", {**full, "bodies": todo}))] if todo else None
        return Step(name, args, needs)

    queue, validation = [], []
    for fold in plan.folds:
        for variant in plan.bench["variants"]:
            scored_by = [lambda c=c: c for _, c in validation_steps(plan, fold, variant)]
            queue.append(Step(f"{fold.name}-{variant}", lambda f=fold, v=variant, c=scored_by:
                              run_args(f, v) if needed(c) else None))
    for fold in plan.folds:
        for body in ["pretrained", *plan.bench["variants"]]:
            for name, config in validation_steps(plan, fold, body):
                needs = () if body == "pretrained" else (f"{fold.name}-{body}",)
                queue.append(evaluate(name, lambda c=config: c, needs))
                validation.append(name)
    chosen = tuple(validation)  # the variant is chosen on these
    for fold in plan.folds:
        tests = test_configs(plan, fold)
        # the chosen run again where a test evaluation still needs it (it resumes; a fresh clone
        # has the scores but not the bases)
        queue.append(Step(f"{fold.name}-chosen", lambda f=fold, t=tests: run_args(f, chosen_variant(plan))
                          if needed(list(t.values())) else None, chosen))
        mt_write = write(configs / f"{fold.name}-multitask.yaml", plan.multitask_run(fold))
        mt_uses = [lambda c=c: c for _, c in validation_steps(plan, fold, "multitask")] + [
            lambda t=tests[k]: {**t(), "bodies": [b for b in t()["bodies"] if b["name"] == "multitask"]}
            for k in ("seen", "unseen-per-task", "unseen-per-class")]
        finished = plan.run_dir(fold, "multitask") / "state.json"
        queue.append(Step(f"{fold.name}-multitask", lambda p=mt_write, u=mt_uses, d=finished: ["multitask", str(p)]
                          if needed(u) and not d.exists() else None, chosen))
        for name, config in validation_steps(plan, fold, "multitask"):  # the variants' yardstick, not a choice
            queue.append(evaluate(name, lambda c=config: c, (f"{fold.name}-multitask",)))
        trained = (f"{fold.name}-chosen", f"{fold.name}-multitask")
        queue += [evaluate(f"test-{fold.name}-{kind}", config, trained) for kind, config in tests.items()]
    return queue


def test_configs(plan: Plan, fold: Fold) -> dict[str, Callable[[], dict]]:
    """The test evaluations of a fold, built once the variant is chosen. The ColD Fusion body
    carries its variant's name, so a later choice adds rows instead of reusing another's."""
    def bodies() -> list[dict]:
        return [plan.body(fold, b) for b in ("pretrained", chosen_variant(plan), "multitask")]

    return {
        "seen": lambda: plan.evaluation(f"test-{fold.name}-seen", fold.seen, "linear_probe", bodies(), "test"),
        "unseen-per-task": lambda: plan.evaluation(f"test-{fold.name}-unseen-per-task", fold.unseen, "few_shot",
                                                   bodies(), "test"),
        "unseen-per-class": lambda: plan.evaluation(f"test-{fold.name}-unseen-per-class", fold.unseen, "few_shot",
                                                    bodies(), "test", "few_shot_per_class"),
        "iterations": lambda: iterations_config(plan, fold),
    }


def iterations_config(plan: Plan, fold: Fold) -> dict:
    """Linear probe of every `plot_every`-th version of the chosen run (and its last) on the fold's
    seen and unseen tasks: the plot, every point scored alike on test."""
    variant = chosen_variant(plan)
    name = f"test-{fold.name}-iterations-{variant}"
    last = plan.coldfusion_run(fold, variant)["loop"]["iterations"]
    plotted = [i for i in range(last + 1) if i % plan.bench["coldfusion"].get("plot_every", 1) == 0 or i == last]
    tasks = fold.unseen + fold.seen
    repo_dir = plan.run_dir(fold, variant) / "repository"
    if not Repository.exists_at(repo_dir):  # the names say what is missing; the chosen run is trained before
        return plan.evaluation(name, tasks, "linear_probe", [{"name": f"iteration {i}"} for i in plotted], "test")
    versions = [v for v in Repository(repo_dir).versions()
                if v.run == variant and not v.abandoned and v.iteration in plotted]
    bodies = [{"name": f"iteration {v.iteration}", "repository": str(repo_dir), "version": str(v.id)}
              for v in versions]
    return plan.evaluation(name, tasks, "linear_probe", bodies, "test")


# -- the report ------------------------------------------------------------------------------


def _test_rows(plan: Plan, kind: str, variant: str) -> list[dict]:
    """The test rows of pretrained, multitask and the chosen variant (as `coldfusion`)."""
    rows = [r for f in plan.folds for r in plan.rows(f"test-{f.name}-{kind}")]
    return [{**r, "body": "coldfusion"} if r["body"] == variant else r for r in rows
            if r["body"] in ("pretrained", "multitask", variant)]


def _points(nums: dict | None) -> dict:
    if not nums:
        return {}
    return {"gain": round(100 * nums["gain"], 2), "ci": [round(100 * nums["low"], 2), round(100 * nums["high"], 2)],
            "wins": nums["wins"], "tasks": nums["tasks"]}


def report(plan: Plan, minutes: float) -> dict:
    """report.md, summary.json and plots/iterations.png from the rows measured so far."""
    out, bench = plan.out, plan.bench
    sections, numbers = [], {}
    for fold in plan.folds:  # keep every run's seen-task probes while its run directory is here
        for name in bench["variants"]:
            plan.probe_rows(fold, name)
    scores = validation_scores(plan)
    variant = chosen_variant(plan) if all(plan.rows(s) for f in plan.folds
                                          for s in (f"val-{f.name}-unseen-{v}" for v in bench["variants"])) else None
    for kind, protocol, title in (("seen", "linear_probe", "Seen tasks, linear probe"),
                                  ("unseen-per-task", "few_shot", "Unseen tasks, few-shot: 100 examples per task "
                                                                  "(stratified)"),
                                  ("unseen-per-class", "few_shot", "Unseen tasks, few-shot: 100 examples per class")):
        rows = _test_rows(plan, kind, variant) if variant else []
        if not rows:
            continue
        table, nums = protocol_table(rows, protocol, FINAL, "pretrained")
        _, versus = protocol_table(rows, protocol, ["multitask", "coldfusion"], "multitask")
        numbers[kind] = {"base": nums, "vs_multitask": versus.get("coldfusion")}
        sections.append(f"### {title}\n\n{table}")
    seen, few = numbers.get("seen", {}), numbers.get("unseen-per-task", {})
    summary = {
        "seen_probe_gain": _points(seen.get("base", {}).get("coldfusion")).get("gain"),
        "seen_probe_gain_ci": _points(seen.get("base", {}).get("coldfusion")).get("ci"),
        "seen_probe_vs_multitask": _points(seen.get("vs_multitask")).get("gain"),
        "seen_probe_vs_multitask_ci": _points(seen.get("vs_multitask")).get("ci"),
        "unseen_few_shot_gain": _points(few.get("base", {}).get("coldfusion")).get("gain"),
        "unseen_few_shot_ci": _points(few.get("base", {}).get("coldfusion")).get("ci"),
        "unseen_few_shot_win_rate": (round(few["base"]["coldfusion"]["wins"] / few["base"]["coldfusion"]["tasks"], 3)
                                     if few.get("base", {}).get("coldfusion") else None),
        "unseen_few_shot_vs_multitask": _points(few.get("vs_multitask")).get("gain"),
        "unseen_few_shot_per_class_gain": _points(numbers.get("unseen-per-class", {}).get("base", {})
                                                  .get("coldfusion")).get("gain"),
        "variant": variant,
        "variant_settings": bench["variants"].get(variant) if variant else None,
        "validation_scores": {b: {k: round(100 * v, 2) for k, v in s.items()} for b, s in scores.items()},
        "tasks_seen": sorted({t for f in plan.folds for t in f.seen}),
        "tasks_unseen": [t for f in plan.folds for t in f.unseen],
        "folds": [f.unseen for f in plan.folds],
        "wall_minutes": round(minutes, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot = plot_iterations(plan, variant) if variant else None
    cf = bench["coldfusion"]
    text = (
        "# ColD Fusion benchmark\n\n"
        f"Base `{bench['model']}`, max length {bench['max_length']}, precision {bench.get('precision', 'auto')}. "
        f"{len(plan.folds)} folds; every task is unseen in exactly one: "
        + "; ".join(f"fold {f.index} holds out {', '.join(f.unseen)}" for f in plan.folds) + ". "
        f"ColD Fusion per fold: {cf['iterations']} iterations, {cf['contributors_per_iteration']} of the "
        f"{len(plan.folds[0].seen)} seen tasks' contributors sampled each iteration, {cf['examples_per_contributor']} "
        f"fresh examples each; multitask: `{bench['multitask']['sampler']}` sampler on the same seen tasks, the same "
        f"{plan.budget()} training examples. Accuracy (%) on each task's test split, mean ± sd over seeds "
        f"{bench['evaluation']['seeds']} (the linear probe is deterministic: one seed); gains are paired (same seeds "
        f"and test examples) with 95% bootstrap intervals over test examples and seeds. Wall time "
        f"{minutes:.0f} minutes on this machine (2 CPU cores, two single-threaded jobs).\n\n"
        f"## Targets\n\n{targets(summary)}\n\n"
        f"## The variant, chosen on validation splits only\n\n{variant_table(plan, scores, variant)}\n"
        "The choice reads only the validation scores above. " + search_note(plan) + "\n\n"
        "## Results (test splits, read once)\n\n" + "\n".join(sections)
        + (f"\n## Per iteration\n\n![accuracy per iteration]({plot.relative_to(out)})\n" if plot else ""))
    (out / "report.md").write_text(text)
    return summary


def search_note(plan: Plan) -> str:
    """Where the variants came from: the earlier, wider search beside this benchmark, if committed."""
    search = plan.out.parent / f"{plan.out.name}_search" / "summary.json"
    if not search.exists():
        return ""
    s = json.loads(search.read_text())
    tried = [v for v in s["validation_scores"] if v not in ("pretrained", "multitask")]
    return (f"These variants come from an earlier search on the same folds and budget ({len(tried)} variants: "
            f"{', '.join(tried)}; {s['wall_minutes']:.0f} minutes; chosen there: {s['variant']}; "
            f"`{search.parent.name}/report.md`).")


def variant_table(plan: Plan, scores: dict, variant: str | None) -> str:
    lines = ["| body | settings | unseen few-shot (val) | seen linear probe (val) | criterion (mean) |",
             "|---|---|---:|---:|---:|"]
    for body, s in scores.items():
        settings = ("-" if body in ("pretrained", "multitask")
                    else json.dumps(plan.bench["variants"][body] or "plain averaging"))
        mark = " **(chosen)**" if body == variant else ""
        lines.append(f"| {body}{mark} | `{settings}` | {100 * s['unseen']:.1f} | {100 * s['seen']:.1f} | "
                     f"{100 * s['criterion']:.1f} |")
    return "\n".join(lines) + "\n"


def targets(s: dict) -> str:
    if s["unseen_few_shot_gain"] is None or s["seen_probe_vs_multitask"] is None:
        return "(not measured yet)"
    few_ok = s["unseen_few_shot_gain"] >= 2 and s["unseen_few_shot_ci"][0] > 0 and s["unseen_few_shot_win_rate"] >= 0.75
    mt_ok = s["seen_probe_vs_multitask"] >= 0
    return "\n".join([
        f"- Unseen few-shot (100 per task): {s['unseen_few_shot_gain']:+.2f} points over the base "
        f"[{s['unseen_few_shot_ci'][0]:+.2f}, {s['unseen_few_shot_ci'][1]:+.2f}], better than the base on "
        f"{100 * s['unseen_few_shot_win_rate']:.0f}% of unseen tasks; target (+2, interval above 0, 75% of tasks): "
        f"**{'met' if few_ok else 'not met'}**.",
        f"- Seen linear probe, ColD Fusion ({s['variant']}) minus multitask: {s['seen_probe_vs_multitask']:+.2f} "
        "points "
        f"[{s['seen_probe_vs_multitask_ci'][0]:+.2f}, {s['seen_probe_vs_multitask_ci'][1]:+.2f}]; target (at least "
        f"as good): **{'met' if mt_ok else 'not met'}**.",
        f"- Unseen few-shot, ColD Fusion minus multitask: {s['unseen_few_shot_vs_multitask']:+.2f} points.",
        f"- Compute: {s['wall_minutes']:.0f} minutes over every invocation so far; target (about 120): "
        f"**{'met' if s['wall_minutes'] <= 130 else 'not met'}**.",
        *([] if few_ok and mt_ok else [
            "- Tried, same budget, chosen on validation (table below): "
            + ", ".join(v for v in s["validation_scores"] if v not in ("pretrained", "multitask")) + "."])])


def plot_iterations(plan: Plan, variant: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, list[float]]] = {"seen tasks": {}, "unseen tasks": {}}
    for fold in plan.folds:
        for r in plan.rows(f"test-{fold.name}-iterations-{variant}"):
            group = series["unseen tasks" if r["task"] in fold.unseen else "seen tasks"]
            group.setdefault(int(r["body"].split()[-1]), []).append(r["accuracy"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, data in series.items():
        xs = sorted(data)
        ax.plot(xs, [100 * sum(data[x]) / len(data[x]) for x in xs], marker="o", label=label)
    ax.set_xlabel(f"ColD Fusion iteration ({variant}; 0 = pretrained)")
    ax.set_ylabel("linear-probe accuracy (%), mean")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = plan.out / "plots" / "iterations.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cold_fusion")
    p.add_argument("--quick", action="store_true", help="a few dozen examples: checks the pipeline, not the claim")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the rows measured so far")
    args = p.parse_args()
    bench = yaml.safe_load(args.config.read_text())
    if args.quick:
        bench = shrink(bench)
    plan = Plan(bench, args.out)
    minutes = timed(None if args.report_only else steps(plan), args.out)
    summary = report(plan, minutes)
    print(json.dumps({"kind": "summary", **summary}), flush=True)


if __name__ == "__main__":
    main()
