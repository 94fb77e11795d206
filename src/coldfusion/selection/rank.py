"""`coldfusion rank`: which candidate body is the best start for a target task?

Every candidate is scored by LogME and by a linear probe on its frozen features of the
target (cheap: one forward pass over the target's examples, cached). Optionally the top k
are finetuned on the target over the seeds to confirm, next to the pretrained base, which
gives their intertraining gain (docs/METHODS.md section 3).
"""

import statistics
from dataclasses import dataclass, field

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.progress import SilentProgress
from coldfusion.repository import Repository
from coldfusion.selection.bodies import Body, Encoders
from coldfusion.selection.features import frozen_features
from coldfusion.selection.scores import logme_score, probe_score
from coldfusion.selection.settings import SelectionSettings, compute_of
from coldfusion.selection.transfer import finetune_accuracy
from coldfusion.tasks import Task

SCORES = ("logme", "probe")


@dataclass
class Ranked:
    name: str
    logme: float
    probe: float  # validation accuracy of the linear probe
    costs: dict[str, float] = field(default_factory=dict)  # seconds: features, validation_features, logme, probe
    finetune: float | None = None  # mean test accuracy after finetuning on the target
    finetune_sd: float | None = None
    gain: float | None = None  # finetune minus the base's, same seeds
    finetune_seconds: float | None = None

    @property
    def seconds(self) -> float:
        """What both cheap scores cost, features included."""
        return sum(self.costs.values())


def score_body(store: Repository, encoders: Encoders, body: Body, target: Task, s: SelectionSettings) -> Ranked:
    encoder, compute = encoders(body.source), compute_of(s)
    train, validation = (frozen_features(store, body, encoder, split, s.max_length, s.pooling, s.probe.batch_size,
                                         compute)
                         for split in (target.train.head(s.feature_examples),
                                       target.validation.head(s.validation_examples)))
    logme, logme_seconds = logme_score(train)
    probe, probe_seconds = probe_score(train, validation, target.num_labels, s.probe)
    return Ranked(body.name, logme, probe, {"features": train.seconds, "validation_features": validation.seconds,
                                            "logme": logme_seconds, "probe": probe_seconds})


def finetune_over_seeds(store: Repository, encoders: Encoders, body: Body, target: Task,
                        s: SelectionSettings) -> tuple[list[float], float]:
    """Test accuracy (in points) for each seed, and the total seconds."""
    runs = [finetune_accuracy(store, encoders(body.source), body, target, seed, s) for seed in s.seeds]
    return [100 * acc for acc, _ in runs], sum(seconds for _, seconds in runs)


def rank_candidates(target: Task, candidates: list[Body], s: SelectionSettings, store: Repository,
                    encoders: Encoders, by: str = "logme", top_k: int = 0, base: Body | None = None,
                    progress=None) -> list[Ranked]:
    """The candidates, best first by `by`; the top `top_k` confirmed by finetuning."""
    if by not in SCORES:
        raise ColdFusionError(f"rank by one of {', '.join(SCORES)}, not '{by}'")
    if len({c.name for c in candidates}) != len(candidates):
        raise ColdFusionError("each candidate may be named only once")
    progress = progress or SilentProgress()
    progress.phase(f"scoring {len(candidates)} candidates on {target.name}", len(candidates))
    ranked = []
    for body in candidates:
        ranked.append(score_body(store, encoders, body, target, s))
        progress.advance()
    ranked.sort(key=lambda r: getattr(r, by), reverse=True)
    confirm = ranked[:top_k]
    if confirm:
        bodies = {b.name: b for b in candidates}
        progress.phase(f"finetuning the top {len(confirm)} on {target.name}", len(confirm) + (base is not None))
        reference = None
        if base is not None:
            reference, _ = finetune_over_seeds(store, encoders, base, target, s)
            progress.advance()
        for row in confirm:
            accs, row.finetune_seconds = finetune_over_seeds(store, encoders, bodies[row.name], target, s)
            row.finetune = statistics.fmean(accs)
            row.finetune_sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            if reference is not None:
                row.gain = statistics.fmean(a - r for a, r in zip(accs, reference, strict=True))
            progress.advance()
    return ranked
