"""Model recycling and intermediate-task selection, measured against the truth.

Two parts, each printing JSON lines (and appending them to results/selection.jsonl):

- `logme`: LogME on 10,000 x 384 features, ours (one SVD shared by every class and
  iteration) against a naive implementation of the same definition (per class, per
  iteration: solve the D x D system and take its log-determinant), in the same run;
  the two must agree.
- `harness`: every built-in task as a target, every other as a source: the bundled
  MiniLM intertrained on the source, then finetuned on the target (over the seeds), against
  the MiniLM finetuned directly; SEmb, LogME and the linear probe predict which source
  is best. Prints one row per (source, target) pair, one per target (each method's
  Regret@1, Regret@3, points lost by the top 3, NDCG) and a summary per method with its
  cost in seconds next to brute-force finetuning. Everything is cached in the repository
  (--repository), so a stopped run resumes; about an hour on 2 quiet cores.
  `--intertraining lora` runs it in adapter settings (Poth et al. 2021): a LoRA adapter
  intertrained on each source, the same adapter continued on the target.
- `compare`: the adapter run's pair rows (--out) against the full run's (--full) on the
  same targets and sources: each method's Regret@1/@3, points lost and rank correlation
  under both, and whether the best source is the same.

    python benchmarks/selection.py [--parts logme harness] [--tasks ...] [--targets ...]
        [--intertraining full|lora] [--repository DIR] [--out FILE] [--full FILE]
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "selection.jsonl"


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def naive_logme(f: np.ndarray, y: np.ndarray, max_iter: int = 100, tol: float = 0.01) -> float:
    """LogME straight from its definition: D x D algebra in every iteration of every class."""
    n, d = f.shape
    ftf = f.T @ f
    s = np.linalg.eigvalsh(ftf)
    evidences = []
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        fty = f.T @ t
        alpha = beta = 1.0
        for _ in range(max_iter):
            a = alpha * np.eye(d) + beta * ftf
            m = beta * np.linalg.solve(a, fty)
            gamma = float(np.sum(beta * s / (alpha + beta * s)))
            residual = float(np.sum((t - f @ m) ** 2))
            ratio = alpha / beta
            alpha, beta = gamma / float(m @ m), (n - gamma) / residual
            if abs(alpha / beta - ratio) / ratio < tol:
                break
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, fty)
        residual = float(np.sum((t - f @ m) ** 2))
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - np.linalg.slogdet(a)[1] / 2
                    - beta / 2 * residual - alpha / 2 * float(m @ m) - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def logme_speed(repeats: int = 3) -> None:
    from coldfusion.selection.logme import logme

    rng = np.random.default_rng(0)
    for classes in (2, 20):
        y = rng.integers(0, classes, 10_000)
        f = rng.normal(size=(10_000, 384)) + 0.5 * rng.normal(size=(classes, 384))[y]  # features that carry y
        timings = {}
        for name, fn in (("ours", logme), ("naive", naive_logme)):
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                value = fn(f, y)
                best = min(best, time.perf_counter() - start)
            timings[name] = (best, value)
        emit({"part": "logme", "n": 10_000, "d": 384, "classes": classes, "threads": torch.get_num_threads(),
              "seconds": round(timings["ours"][0], 4), "naive_seconds": round(timings["naive"][0], 4),
              "speedup": round(timings["naive"][0] / timings["ours"][0], 1),
              "logme": timings["ours"][1], "naive_logme": timings["naive"][1],
              "abs_difference": abs(timings["ours"][1] - timings["naive"][1])})


def harness(targets: list[str] | None, repository: Path, settings_path: Path | None, pool: list[str] | None = None,
            intertraining: str | None = None) -> None:
    from coldfusion.infra.progress import RichProgress
    from coldfusion.infra.runtime import use_compute
    from coldfusion.repository import Repository
    from coldfusion.selection.bodies import Encoders, load_candidate
    from coldfusion.selection.harness import evaluate_target, summarize
    from coldfusion.selection.select import METHODS
    from coldfusion.selection.settings import load_selection_settings
    from coldfusion.tasks import CATALOG, load_task

    s = load_selection_settings(settings_path)
    if intertraining:
        s = s.model_copy(update={"intertraining": intertraining})
    use_compute(s)
    store, encoders = Repository(repository), Encoders()
    base = load_candidate("default", encoders)
    tasks = {name: load_task(name) for name in pool or CATALOG}
    results = []
    with RichProgress() as progress:
        for name in targets or list(tasks):
            sources = [t for n, t in tasks.items() if n != name]
            r = evaluate_target(tasks[name], sources, base, s, store, encoders, progress)
            results.append(r)
            truth, baseline = r.mean_truth, sum(r.baseline) / len(r.baseline)
            for source in truth:
                emit({"part": "pair", "target": name, "source": source, "accuracy": round(truth[source], 2),
                      "per_seed": r.truth[source], "gain": round(truth[source] - baseline, 2),
                      **{m: r.scores[m][source] for m in METHODS}})
            emit({"part": "target", "target": name, "baseline": round(baseline, 2),
                  "best_source": max(truth, key=truth.get), "best_gain": round(max(truth.values()) - baseline, 2),
                  **{m: {k: round(v, 3) for k, v in r.quality(m).items()} for m in METHODS},
                  "random": {k: round(v, 3) for k, v in r.random_quality().items()}})
    emit({"part": "settings", **s.model_dump(mode="json")})
    for row in summarize(results):
        emit({"part": "summary", **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}})


def compare(adapter_file: Path, full_file: Path) -> None:
    """Each method's ranking quality under adapter intertraining (the pair rows of adapter_file)
    next to full intertraining on the same targets and sources (the pair rows of full_file,
    restricted to the adapter run's tasks): the same TargetResult.quality, from the rows."""
    from coldfusion.selection.harness import TargetResult
    from coldfusion.selection.ranking_quality import spearman
    from coldfusion.selection.select import METHODS

    def targets(path: Path, pool: set[str] | None = None) -> dict[str, TargetResult]:
        out: dict[str, TargetResult] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("part") != "pair" or (pool and not {row["target"], row["source"]} <= pool):
                continue
            r = out.setdefault(row["target"], TargetResult(row["target"], [], {}, {m: {} for m in METHODS}))
            r.truth[row["source"]] = row["per_seed"]
            for m in METHODS:
                r.scores[m][row["source"]] = row[m]
        return out

    adapter = targets(adapter_file)
    pool = set(adapter) | {s for r in adapter.values() for s in r.truth}
    full = targets(full_file, pool)
    shared = sorted(set(adapter) & set(full))
    if set(shared) != set(adapter) or any(set(full[t].truth) != set(adapter[t].truth) for t in shared):
        raise SystemExit(f"compare: {full_file} lacks the pairs of {adapter_file}; run the full harness on "
                         f"--tasks {' '.join(sorted(pool))} first")
    for method in (*METHODS, "random"):
        row = {"part": "compare", "method": method, "targets": len(shared), "tasks": sorted(pool)}
        for name, results in (("full", full), ("lora", adapter)):
            quality = [results[t].random_quality() if method == "random" else results[t].quality(method)
                       for t in shared]
            for key in ("regret@1", "regret@3", "lost@3", "spearman"):
                row[f"{key}_{name}"] = round(statistics.fmean(q[key] for q in quality), 3)
        emit(row)
    for t in shared:  # does the same source help under both? (the truth each ranking is scored against)
        best = {name: max(r[t].mean_truth, key=r[t].mean_truth.get) for name, r in (("full", full), ("lora", adapter))}
        emit({"part": "compare_target", "target": t, "best_source_full": best["full"], "best_source_lora": best["lora"],
              "truth_spearman": round(spearman(full[t].mean_truth, adapter[t].mean_truth), 3)})


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["logme", "harness"], choices=["logme", "harness", "compare"])
    parser.add_argument("--tasks", nargs="+", help="the built-in tasks that are sources and targets (default: all)")
    parser.add_argument("--targets", nargs="+", help="of those, the targets (default: all of them)")
    parser.add_argument("--intertraining", choices=["full", "lora"],
                        help="override the settings' intertraining: the whole body, or a LoRA adapter")
    parser.add_argument("--repository", type=Path, default=Path("/tmp/coldfusion-selection-bench"),
                        help="where intertrained bodies, features and finetune scores are cached")
    parser.add_argument("--settings", type=Path, default=HERE / "selection.yaml", help="selection settings YAML")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON lines are appended here too")
    parser.add_argument("--full", type=Path, default=OUT,
                        help="compare: the full-intertraining harness rows that --out's adapter rows are set against")
    args = parser.parse_args()
    OUT = args.out
    torch.set_num_threads(2)
    OUT.parent.mkdir(exist_ok=True)
    if "logme" in args.parts:
        logme_speed()
    if "harness" in args.parts:
        harness(args.targets, args.repository, args.settings, args.tasks, args.intertraining)
    if "compare" in args.parts:
        compare(args.out, args.full)


if __name__ == "__main__":
    main()
