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

    python benchmarks/selection.py [--parts logme harness] [--tasks ...] [--targets ...]
        [--intertraining full|lora] [--repository DIR] [--out FILE]
"""

import argparse
import json
import math
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


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["logme", "harness"], choices=["logme", "harness"])
    parser.add_argument("--tasks", nargs="+", help="the built-in tasks that are sources and targets (default: all)")
    parser.add_argument("--targets", nargs="+", help="of those, the targets (default: all of them)")
    parser.add_argument("--intertraining", choices=["full", "lora"],
                        help="override the settings' intertraining: the whole body, or a LoRA adapter")
    parser.add_argument("--repository", type=Path, default=Path("/tmp/coldfusion-selection-bench"),
                        help="where intertrained bodies, features and finetune scores are cached")
    parser.add_argument("--settings", type=Path, default=HERE / "selection.yaml", help="selection settings YAML")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON lines are appended here too")
    args = parser.parse_args()
    OUT = args.out
    torch.set_num_threads(2)
    OUT.parent.mkdir(exist_ok=True)
    if "logme" in args.parts:
        logme_speed()
    if "harness" in args.parts:
        harness(args.targets, args.repository, args.settings, args.tasks, args.intertraining)


if __name__ == "__main__":
    main()
