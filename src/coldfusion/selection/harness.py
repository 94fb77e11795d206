"""How good are the rankings? Measure them against the real intertraining gains.

For every target among the tasks, every other task is a source: the base is finetuned on
the source (intertraining), then on the target, over the seeds; the base is also
finetuned on the target directly. The mean test accuracy after intertraining on each
source is the truth that SEmb, LogME and the linear probe try to predict, and that
Regret@k and NDCG (docs/METHODS.md section 4) score them against. Everything is cached in the
repository, so the harness resumes where it stopped and its costs stay known.
"""

import itertools
import math
import statistics
from dataclasses import dataclass, field

from coldfusion.infra.progress import SilentProgress
from coldfusion.repository import Repository
from coldfusion.selection.bodies import Body, Encoders
from coldfusion.selection.rank import finetune_over_seeds
from coldfusion.selection.ranking_quality import ndcg, regret_at_k, spearman
from coldfusion.selection.select import METHODS, score_sources
from coldfusion.selection.settings import SelectionSettings
from coldfusion.tasks import Task

# The work each predictor needs (keys of SourceScore.seconds); intertraining is listed
# apart, because in model recycling the source-finetuned bodies already exist.
COMPONENTS = {"semb": ("source_features", "target_features", "semb"),
              "logme": ("features", "logme"),
              "probe": ("features", "validation_features", "probe")}


@dataclass
class TargetResult:
    target: str
    baseline: list[float]  # test accuracy (points) of the base finetuned on the target, per seed
    truth: dict[str, list[float]]  # source -> accuracy after intertraining on it, per seed
    scores: dict[str, dict[str, float]]  # method -> source -> predicted score
    costs: dict[tuple, float] = field(default_factory=dict)  # (component, source, target) -> seconds

    @property
    def mean_truth(self) -> dict[str, float]:
        return {source: statistics.fmean(accs) for source, accs in self.truth.items()}

    def predicted(self, method: str) -> list[str]:
        return sorted(self.scores[method], key=self.scores[method].get, reverse=True)

    def quality(self, method: str) -> dict[str, float]:
        """Regret@1 and @3 (percent of the best accuracy), points lost by the top 3, NDCG, and
        the rank correlation of the scores with the truth."""
        truth, order = self.mean_truth, self.predicted(method)
        best = max(truth.values())
        return {"regret@1": regret_at_k(truth, order, 1), "regret@3": regret_at_k(truth, order, 3),
                "lost@3": best - max(truth[s] for s in order[:3]), "ndcg": ndcg(truth, order),
                "spearman": spearman(truth, self.scores[method])}

    def random_quality(self) -> dict[str, float]:
        """What a random order scores on average (exactly: its top k is a uniform k-subset)."""
        truth = self.mean_truth
        values, best = list(truth.values()), max(truth.values())
        expected_best = {k: statistics.fmean(max(c) for c in itertools.combinations(values, min(k, len(values))))
                         for k in (1, 3)}
        discounts = [1 / math.log2(rank + 2) for rank in range(len(values))]
        ideal = sum(v * d for v, d in zip(sorted(values, reverse=True), discounts, strict=True))
        return {"regret@1": (best - expected_best[1]) / best * 100, "regret@3": (best - expected_best[3]) / best * 100,
                "lost@3": best - expected_best[3], "ndcg": statistics.fmean(values) * sum(discounts) / ideal,
                "spearman": 0.0}


def evaluate_target(target: Task, sources: list[Task], base: Body, s: SelectionSettings, store: Repository,
                    encoders: Encoders, progress=None) -> TargetResult:
    progress = progress or SilentProgress()
    scored = score_sources(target, sources, base, s, store, encoders, progress)
    result = TargetResult(target.name, [], {}, {m: {r.source: r.score(m) for r in scored} for m in METHODS})
    for r in scored:
        for component, seconds in r.seconds.items():
            source = None if component == "target_features" else r.source
            owner = None if component in ("intertrain", "source_features") else target.name
            result.costs[(component, source, owner)] = seconds
    progress.phase(f"finetuning on {target.name} after each source ({len(s.seeds)} seeds)", len(scored) + 1)
    result.baseline, seconds = finetune_over_seeds(store, encoders, base, target, s)
    result.costs[("baseline_finetune", None, target.name)] = seconds
    progress.advance()
    for r in scored:
        result.truth[r.source], seconds = finetune_over_seeds(store, encoders, r.body, target, s)
        result.costs[("finetune", r.source, target.name)] = seconds
        progress.advance()
    return result


def summarize(results: list[TargetResult]) -> list[dict]:
    """One row per predictor (and a random order): its mean ranking quality over the
    targets, and its cost in seconds next to brute force (finetuning every pair)."""
    costs = {}
    for r in results:
        costs.update(r.costs)
    total = lambda names: sum(v for (c, _, _), v in costs.items() if c in names)  # noqa: E731
    intertraining = total(("intertrain",))
    brute_force = total(("finetune", "baseline_finetune"))
    rows = []
    for method in (*METHODS, "random"):
        quality = [r.random_quality() if method == "random" else r.quality(method) for r in results]
        row = {"method": method, **{k: statistics.fmean(q[k] for q in quality) for k in quality[0]},
               "targets": len(results)}
        if method in COMPONENTS:
            row["seconds"] = total(COMPONENTS[method])
            row["seconds_with_intertraining"] = row["seconds"] + (intertraining if method != "semb" else 0.0)
        rows.append(row)
    rows.append({"method": "brute_force", "regret@1": 0.0, "regret@3": 0.0, "lost@3": 0.0, "ndcg": 1.0, "spearman": 1.0,
                 "targets": len(results), "seconds": brute_force,
                 "seconds_with_intertraining": brute_force + intertraining})
    return rows
