"""The ColD Fusion benchmark: does the fused base beat the pretrained one and multitask learning?

From configs/benchmark.yaml (seen tasks, unseen tasks, budgets):

1. `coldfusion run` on the seen tasks and `coldfusion multitask` on the same seen data
   with the same number of training examples;
2. `coldfusion evaluate` of pretrained / ColD Fusion / multitask on the seen tasks
   (linear probe, finetune) and on the unseen tasks (finetune, few-shot), one evaluation
   per (group, body), and a linear probe of every ColD Fusion iteration on the unseen
   tasks. All of it runs on two single-threaded workers, each taking the next step whose
   body exists (the multitask body's evaluations start while ColD Fusion still trains);
3. report.md in the style of the publication's Table 1 (a row per task, a column per
   model, averages, gains with 95% paired-bootstrap intervals, share of tasks beating
   the base), the targets of the issue checked plainly, and plots/iterations.png.

Every step resumes: rerunning the script continues where it stopped. `--quick` shrinks
everything to check the pipeline in a few minutes. Prints JSON lines (phase timings,
then the headline numbers).
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

from coldfusion.evaluation.config import EvalConfig  # noqa: E402
from coldfusion.evaluation.report import protocol_table  # noqa: E402
from coldfusion.evaluation.run import seeds_of  # noqa: E402
from coldfusion.io.results import ResultsLog  # noqa: E402
from coldfusion.repository import Repository  # noqa: E402

BODIES = ["pretrained", "coldfusion", "multitask"]


def shrink(bench: dict) -> dict:
    """--quick: the same pipeline on a few dozen examples."""
    bench = json.loads(json.dumps(bench))
    bench["seen"], bench["unseen"] = bench["seen"][:2], bench["unseen"][:2]
    bench["coldfusion"].update(iterations=1, examples_per_contributor=48)
    ev = bench["evaluation"]
    ev.update(seeds=ev["seeds"][:2], train_examples=48, validation_examples=32, test_examples=48)
    ev["finetune"]["epochs"] = 1
    ev["few_shot"].update(k=4)
    ev["few_shot"]["finetune"]["epochs"] = 1
    return bench


def configs(bench: dict, out: Path) -> dict[str, dict]:
    """The four command configs the benchmark is made of."""
    runs = out / "runs"
    common = {"model": bench["model"], "max_length": bench["max_length"], "seed": bench["seed"], "threads": 1,
              "precision": bench.get("precision", "auto")}
    cf, ft, ev = bench["coldfusion"], bench["finetune"], bench["evaluation"]
    budget = cf["iterations"] * len(bench["seen"]) * cf["examples_per_contributor"]  # training examples
    run = {**common, "name": "coldfusion", "tasks": bench["seen"], "output_dir": str(runs),
           "loop": {"iterations": cf["iterations"], "examples_per_contributor": cf["examples_per_contributor"]},
           "finetune": ft, "fusion": cf.get("fusion", {"method": "average"}),
           # the per-iteration probe of the seen tasks on the same examples as the final evaluation
           "evaluation": {k: ev[k] for k in ("train_examples", "validation_examples", "test_examples")}}
    multitask = {**common, "name": "multitask", "tasks": bench["seen"], "output_dir": str(runs),
                 "multitask": {**bench["multitask"], "steps": max(1, budget // ft["batch_size"]),
                               "optimizer": {k: v for k, v in ft.items() if k != "epochs"}}}
    bodies = [{"name": "pretrained", "model": bench["model"]},
              {"name": "coldfusion", "repository": str(runs / "coldfusion" / "repository")},
              {"name": "multitask", "repository": str(runs / "multitask" / "repository")}]
    evaluation = {k: ev[k] for k in ("seeds", "train_examples", "validation_examples", "test_examples", "finetune",
                                     "few_shot", "probe") if k in ev}
    evaluation = {**evaluation, "max_length": bench["max_length"], "threads": 1, "precision": common["precision"],
                  "bodies": bodies,
                  "reference": "pretrained", "output_dir": str(out / "evaluations")}
    seen = {**evaluation, "name": "seen", "tasks": bench["seen"], "protocols": ev["seen_protocols"]}
    unseen = {**evaluation, "name": "unseen", "tasks": bench["unseen"], "protocols": ev["unseen_protocols"]}
    return {"run": run, "multitask": multitask, "seen": seen, "unseen": unseen}


def iterations_config(bench_configs: dict, out: Path) -> dict:
    """Linear probe of every ColD Fusion version on the unseen tasks (for the per-iteration plot)."""
    repo_dir = out / "runs" / "coldfusion" / "repository"
    versions = [v for v in Repository(repo_dir).versions() if v.run == "coldfusion" and not v.abandoned]
    return {**bench_configs["unseen"], "name": "iterations", "protocols": ["linear_probe"], "reference": "iteration 0",
            "bodies": [{"name": f"iteration {v.iteration}", "repository": str(repo_dir), "version": str(v.id)}
                       for v in versions]}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _call(name: str, cmd: list[str], out: Path) -> str | None:
    log = out / "logs" / f"{name}.log"
    with open(log, "a") as f:
        if subprocess.call([sys.executable, "-m", "coldfusion", *cmd], stdout=f, stderr=subprocess.STDOUT, env=_env()):
            return f"{name} failed: see {log}"
    return None


@dataclass
class Step:
    name: str
    args: Callable[[], list[str] | None]  # built when the step starts (it may need what earlier steps made); None: done
    needs: tuple[str, ...] = ()


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
            args = step.args()
            failure = _call(step.name, args, out) if args is not None else None
            with lock:
                failures.extend([failure] if failure else [])
                done.add(step.name)
                lock.notify_all()
            print(json.dumps({"kind": "step", "step": step.name, "failed": bool(failure)}), flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        sys.exit("; ".join(failures))


def phase(name: str, started: float) -> None:
    print(json.dumps({"kind": "phase", "phase": name, "minutes": round((time.perf_counter() - started) / 60, 1)}),
          flush=True)


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cold_fusion")
    p.add_argument("--quick", action="store_true", help="a few dozen examples: checks the pipeline, not the claim")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from the rows measured so far")
    args = p.parse_args()
    bench = yaml.safe_load(args.config.read_text())
    if args.quick:
        bench = shrink(bench)
    out = args.out
    if args.report_only:  # the wall time of the last full run, if it finished
        log = out / "benchmark.jsonl"
        phases = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        report(bench, out, minutes=next((p["minutes"] for p in phases if p.get("kind") == "phase"), None))
        return
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cfgs = configs(bench, out)
    paths = {k: write(out / "configs" / f"{k}.yaml", v) for k, v in cfgs.items()}
    start = time.perf_counter()
    run_queue(steps(cfgs, paths, out), out)
    phase("train and evaluate", start)
    report(bench, out, minutes=(time.perf_counter() - start) / 60)


def evaluation_name(group: str, body: str) -> str:
    return f"{group}-{body}"


def steps(cfgs: dict, paths: dict, out: Path) -> list[Step]:
    """Training, then one evaluation per (group, body), so each starts as soon as its body
    exists and the pretrained base's evaluations fill the wait for the others."""
    run_dir = out / "runs" / "coldfusion"
    trained_by = {"pretrained": (), "coldfusion": ("coldfusion-run",), "multitask": ("multitask",)}
    resume = lambda: ["--resume"] if (run_dir / "config.yaml").exists() else []  # noqa: E731
    queue = [Step("coldfusion-run", lambda: ["run", str(paths["run"]), *resume()]),
             Step("multitask", lambda: None if (out / "runs" / "multitask" / "state.json").exists()
                  else ["multitask", str(paths["multitask"])])]
    for body in ("multitask", "coldfusion", "pretrained"):  # bodies ready first go first
        for group in ("seen", "unseen"):
            spec = next(b for b in cfgs[group]["bodies"] if b["name"] == body)
            name = evaluation_name(group, body)
            path = write(out / "configs" / f"{name}.yaml",
                         {**cfgs[group], "name": name, "bodies": [spec], "reference": None})
            queue.append(Step(f"evaluate-{name}", lambda p=path: ["evaluate", str(p)], trained_by[body]))
    queue.append(Step("evaluate-iterations", lambda: ["evaluate", str(write(
        out / "configs" / "iterations.yaml", iterations_config(cfgs, out)))], ("coldfusion-run",)))
    return queue


def report(bench: dict, out: Path, minutes: float | None) -> None:
    """report.md: Table 1, the issue's targets checked, the per-iteration plot."""
    ev, cfgs = out / "evaluations", configs(bench, out)
    logs = lambda group: [ResultsLog(ev / evaluation_name(group, b) / "results.jsonl") for b in BODIES]  # noqa: E731
    rows = {group: [r for log in logs(group) for r in log.rows()] for group in ("seen", "unseen")}
    rows["iterations"] = ResultsLog(ev / "iterations" / "results.jsonl").rows()
    expected = {}
    for group in ("seen", "unseen"):
        config = EvalConfig.model_validate(cfgs[group])
        expected[group] = len(config.tasks) * len(BODIES) * sum(len(seeds_of(p, config)) for p in config.protocols)
    missing = {k: n - len(rows[k]) for k, n in expected.items() if len(rows[k]) < n}
    sections, numbers = [], {}
    for group, protocols in (("seen", bench["evaluation"]["seen_protocols"]),
                             ("unseen", bench["evaluation"]["unseen_protocols"])):
        for protocol in protocols:
            table, nums = protocol_table(rows[group], protocol, BODIES, "pretrained")
            numbers[(group, protocol)] = nums
            sections.append(f"### {group} tasks, {protocol}\n\n{table}")
    plot = plot_iterations(out, rows["iterations"])
    checks = targets(numbers, rows)
    cf = bench["coldfusion"]
    text = (
        f"# ColD Fusion benchmark\n\n"
        f"Base: `{bench['model']}`; seen tasks (contributors, multitask data): {', '.join(bench['seen'])}; "
        f"unseen tasks (held out): {', '.join(bench['unseen'])}. ColD Fusion: {cf['iterations']} iterations, "
        f"{cf['examples_per_contributor']} fresh examples per contributor per iteration, fusion "
        f"`{cf.get('fusion', {'method': 'average'})['method']}`; multitask: `{bench['multitask']['sampler']}` "
        f"sampler, the same number of training examples. Accuracy (%) on each test split, mean ± sd over seeds "
        f"{bench['evaluation']['seeds']} (the linear probe is deterministic: one seed). Gains are paired (same "
        f"seeds and test examples) with 95% bootstrap intervals over test examples and seeds. "
        + (f"Wall time: {minutes:.0f} minutes on this machine.\n\n" if minutes is not None else "\n\n")
        + (f"**Incomplete**: rows still to measure {missing}; rerun the script to finish (it resumes).\n\n"
           if missing else "") +
        f"## Targets\n\n{checks}\n\n{tried(out)}## Results\n\n" + "\n".join(sections) +
        f"\n## Per iteration\n\n![accuracy per iteration]({plot.relative_to(out)})\n")
    (out / "report.md").write_text(text)
    headline = {f"{g}/{p}": {b: {k: round(v, 4) if isinstance(v, float) else v for k, v in n.items()}
                             for b, n in nums.items()} for (g, p), nums in numbers.items()}
    minutes = None if minutes is None else round(minutes, 1)
    print(json.dumps({"kind": "summary", "minutes": minutes, "gains_over_pretrained": headline}), flush=True)


def tried(out: Path) -> str:
    """What benchmarks/cold_fusion_tuning.py tried for the unseen few-shot target (validation only)."""
    tuning = out.parent / "cold_fusion_tuning" / "report.md"
    if not tuning.exists():
        return ""
    lines = [line for line in tuning.read_text().splitlines() if line.startswith("- `")]
    return ("## What was tried for the few-shot target\n\nOn the unseen tasks' validation splits (never test), "
            "variants stopped after 3 iterations, few-shot gain over the base "
            "(../cold_fusion_tuning/report.md):\n\n" + "\n".join(lines) +
            "\n\nNone is distinguishable from the base or from the others, so the benchmark keeps its settings.\n\n")


def targets(numbers: dict, rows: dict) -> str:
    lines = []
    seen_lp = numbers.get(("seen", "linear_probe"), {}).get("coldfusion")
    if seen_lp:
        ok = seen_lp["low"] > 0 and seen_lp["gain"] >= 0.02
        lines.append(f"- Seen tasks, linear probe: ColD Fusion {100 * seen_lp['gain']:+.1f} points over the base "
                     f"[{100 * seen_lp['low']:+.1f}, {100 * seen_lp['high']:+.1f}]; target (interval above 0, "
                     f"mean >= 2): **{'met' if ok else 'not met'}**.")
    few = numbers.get(("unseen", "few_shot"), {}).get("coldfusion")
    if few:
        ok = few["gain"] >= 0.02 and few["wins"] >= 0.75 * few["tasks"]
        lines.append(f"- Unseen tasks, few-shot: {100 * few['gain']:+.1f} points [{100 * few['low']:+.1f}, "
                     f"{100 * few['high']:+.1f}], better than the base on {few['wins']}/{few['tasks']} tasks; "
                     f"target (+2 points, 75% of tasks): **{'met' if ok else 'not met'}**.")
    for protocol in ("finetune", "few_shot"):
        cf = numbers.get(("unseen", protocol), {}).get("coldfusion")
        mt = numbers.get(("unseen", protocol), {}).get("multitask")
        if cf and mt:
            ok = cf["gain"] >= mt["gain"]
            lines.append(f"- Unseen tasks, {protocol}: ColD Fusion {100 * cf['gain']:+.1f} vs multitask "
                         f"{100 * mt['gain']:+.1f} over the base; target (ColD Fusion at least as good): "
                         f"**{'met' if ok else 'not met'}**.")
    return "\n".join(lines) or "(no results yet)"


def plot_iterations(out: Path, iteration_rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [r for r in ResultsLog(out / "runs" / "coldfusion" / "results.jsonl").rows() if r.get("kind") == "probe"]
    by_iter = {}
    for r in seen:
        by_iter.setdefault(r["iteration"], []).append(r["accuracy"])
    unseen = {}
    for r in iteration_rows:
        unseen.setdefault(int(r["body"].split()[-1]), []).append(r["accuracy"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, data in (("seen tasks", by_iter), ("unseen tasks", unseen)):
        xs = sorted(data)
        ax.plot(xs, [100 * sum(data[x]) / len(data[x]) for x in xs], marker="o", label=label)
    ax.set_xlabel("ColD Fusion iteration (0 = pretrained)")
    ax.set_ylabel("linear-probe accuracy (%), mean")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "plots" / "iterations.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
