"""Tune ColD Fusion for the unseen few-shot target, on validation splits only.

Each variant of configs/benchmark_tuning.yaml is the benchmark's ColD Fusion run with a
few settings changed, stopped after a few iterations; every variant and the pretrained
base are then few-shot finetuned on the unseen tasks and scored on their validation
splits (`held_out: validation`), over the benchmark's seeds. The report ranks the
variants by their paired gain over the base; the benchmark's test splits are never read.

Two single-threaded jobs run side by side (`run_queue`); every step resumes. The baseline variant
reuses the benchmark's own run when that run exists (its iteration-k version is what a
k-iteration run with the same settings produces). Prints JSON lines.
"""

import argparse
import json
import time
from pathlib import Path

import yaml
from cold_fusion import ROOT, Step, configs, phase, run_queue, write

from coldfusion.collab.config import RunConfig
from coldfusion.evaluation.report import protocol_table
from coldfusion.io.results import ResultsLog
from coldfusion.repository import Repository

HERE = Path(__file__).resolve().parent


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def variant_run(bench_run: dict, name: str, overrides: dict, iterations: int, out: Path) -> dict:
    run = merge(bench_run, overrides)
    return {**run, "name": name, "output_dir": str(out / "runs"), "loop": {**run["loop"], "iterations": iterations}}


def reusable(bench_out: Path, run: dict, iterations: int) -> dict | None:
    """The benchmark's own run as this variant's body, if it has the same settings and got far enough."""
    saved = bench_out / "runs" / "coldfusion" / "config.yaml"
    if not saved.exists():
        return None

    def settings(config: dict) -> dict:  # everything but where it goes and how long it runs
        full = RunConfig.model_validate(config).model_dump(mode="json")
        del full["name"], full["output_dir"], full["loop"]["iterations"]
        return full

    repo_dir = saved.parent / "repository"
    versions = [v for v in Repository(repo_dir).versions()
                if v.run == "coldfusion" and v.iteration == iterations and not v.abandoned]
    if not versions or settings(yaml.safe_load(saved.read_text())) != settings(run):
        return None
    return {"repository": str(repo_dir), "version": str(versions[0].id)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark_tuning.yaml")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cold_fusion_tuning")
    p.add_argument("--benchmark-out", type=Path, default=HERE / "results" / "cold_fusion")
    args = p.parse_args()
    tuning = yaml.safe_load(args.config.read_text())
    bench = yaml.safe_load((args.config.parent / tuning["benchmark"]).read_text())
    out, k = args.out, tuning["iterations"]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    base_cfgs = configs(bench, args.benchmark_out)
    unseen = {**base_cfgs["unseen"], "protocols": ["few_shot"], "held_out": "validation"}

    # work: (cost, run command or None, body); spread over two jobs by cost
    jobs: list[list] = [[], []]
    bodies: list[list[dict]] = [[], []]
    load = [0, 0]
    items = [(1, None, {"name": "pretrained", "model": bench["model"]})]
    for name, overrides in tuning["variants"].items():
        run = variant_run(base_cfgs["run"], name, overrides or {}, k, out)
        body = reusable(args.benchmark_out, run, k)
        if body is not None:
            items.append((1, None, {"name": name, **body}))
            continue
        repo = out / "runs" / name / "repository"
        run_dir = out / "runs" / name
        cmd = ["run", str(write(out / "configs" / f"run-{name}.yaml", run))]
        cmd += ["--resume"] if (run_dir / "config.yaml").exists() else []
        items.append((2, (f"run-{name}", cmd), {"name": name, "repository": str(repo)}))
    for cost, command, body in sorted(items, key=lambda item: -item[0]):
        j = load.index(min(load))
        load[j] += cost
        bodies[j].append(body)
        if command:
            jobs[j].append(command)
    names = []
    for j in range(2):
        if bodies[j]:
            cfg = {**unseen, "name": f"job{j}", "bodies": bodies[j], "reference": None,
                   "output_dir": str(out / "evaluations")}
            jobs[j].append((f"evaluate-job{j}", ["evaluate", str(write(out / "configs" / f"evaluate-job{j}.yaml",
                                                                          cfg))]))
            names.append(f"job{j}")
    start = time.perf_counter()
    # each job's commands in order (a step needs the one before it); the two jobs side by side
    run_queue([Step(name, lambda c=cmd: c, (job[i - 1][0],) if i else ())
               for job in jobs for i, (name, cmd) in enumerate(job)], out)
    phase("tuning: variant runs, then few-shot on validation", start)
    report(tuning, bench, out, names, minutes=(time.perf_counter() - start) / 60)


def report(tuning: dict, bench: dict, out: Path, names: list[str], minutes: float) -> None:
    rows = [r for n in names for r in ResultsLog(out / "evaluations" / n / "results.jsonl").rows()]
    variants = list(tuning["variants"])
    table, numbers = protocol_table(rows, "few_shot", ["pretrained", *variants], "pretrained")
    ranked = sorted(variants, key=lambda v: -numbers.get(v, {}).get("gain", float("-inf")))
    best = ranked[0]
    lines = [f"- `{v}` ({tuning['variants'][v] or 'the benchmark settings'}): "
             f"{100 * numbers[v]['gain']:+.1f} points [{100 * numbers[v]['low']:+.1f}, {100 * numbers[v]['high']:+.1f}]"
             f", better than the base on {numbers[v]['wins']}/{numbers[v]['tasks']} tasks" for v in ranked
             if v in numbers]
    text = (f"# Tuning ColD Fusion for unseen few-shot (validation splits only)\n\n"
            f"Variants of the benchmark's ColD Fusion run, each stopped after {tuning['iterations']} iterations; "
            f"few-shot finetuning (k = {bench['evaluation']['few_shot']['k']} per class) on the unseen tasks "
            f"({', '.join(bench['unseen'])}), scored on their validation splits, seeds "
            f"{bench['evaluation']['seeds']}. Gains are paired with the pretrained base (95% bootstrap intervals "
            f"over validation examples and seeds). Wall time: {minutes:.0f} minutes.\n\n"
            f"## Gain over the pretrained base\n\n" + "\n".join(lines) +
            f"\n\nHighest on validation: `{best}`.\n\n## Accuracy (%)\n\n{table}")
    (out / "report.md").write_text(text)
    print(json.dumps({"kind": "summary", "minutes": round(minutes, 1), "best": best,
                      "gains": {v: {k: round(x, 4) if isinstance(x, float) else x for k, x in n.items()}
                                for v, n in numbers.items()}}), flush=True)


if __name__ == "__main__":
    main()
