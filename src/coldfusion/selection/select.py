"""`coldfusion select`: which source tasks would help a target most as intermediate tasks?

Three predictors (docs/METHODS.md section 4), none of which finetunes on the target:
- SEmb: cosine of the base's mean sentence embeddings of the source's and target's texts;
- LogME of the source-finetuned body (the base intertrained on the source) on the target;
- the linear probe of that body on the target.
The intertrained bodies are cached in the repository; `rank` could reuse them as candidates.
"""

from dataclasses import dataclass, field

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.progress import SilentProgress
from coldfusion.repository import Repository
from coldfusion.selection.bodies import Body, Encoders
from coldfusion.selection.features import frozen_features
from coldfusion.selection.rank import score_body
from coldfusion.selection.scores import semb_similarity
from coldfusion.selection.settings import SelectionSettings, compute_of
from coldfusion.selection.transfer import intertrain
from coldfusion.tasks import Task

METHODS = ("semb", "logme", "probe")


@dataclass
class SourceScore:
    source: str
    semb: float
    logme: float
    probe: float
    body: Body  # the base intertrained on the source
    seconds: dict[str, float] = field(default_factory=dict)  # what each piece of work cost

    def score(self, method: str) -> float:
        return getattr(self, method)


def score_sources(target: Task, sources: list[Task], base: Body, s: SelectionSettings, store: Repository,
                  encoders: Encoders, progress=None) -> list[SourceScore]:
    """Every source's three scores for the target, best first by LogME."""
    names = [t.name for t in sources]
    if target.name in names or len(set(names)) != len(names):
        raise ColdFusionError(f"sources must be distinct and differ from the target '{target.name}': {names}")
    progress = progress or SilentProgress()
    encoder, compute = encoders(base.source), compute_of(s)
    features = lambda body, task: frozen_features(  # noqa: E731
        store, body, encoder, task.train.head(s.feature_examples), s.max_length, s.pooling, s.probe.batch_size,
        compute)
    target_mean = features(base, target)
    progress.phase(f"scoring {len(sources)} sources for {target.name}", len(sources))
    scored = []
    for source in sources:
        body, intertrain_seconds = intertrain(store, encoder, base, source, s)
        source_mean = features(base, source)
        semb, semb_seconds = semb_similarity(source_mean, target_mean)
        cheap = score_body(store, encoders, body, target, s)
        scored.append(SourceScore(source.name, semb, cheap.logme, cheap.probe, body, {
            "intertrain": intertrain_seconds, "source_features": source_mean.seconds,
            "target_features": target_mean.seconds, "semb": semb_seconds, **cheap.costs}))
        progress.advance()
    return sorted(scored, key=lambda r: r.logme, reverse=True)
