"""What `coldfusion rank` and `coldfusion select` do, from the strings a user types."""

from pathlib import Path

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.progress import SilentProgress
from coldfusion.infra.runtime import use_compute
from coldfusion.repository import Repository
from coldfusion.selection.bodies import Encoders, load_candidate
from coldfusion.selection.rank import SCORES, Ranked, rank_candidates
from coldfusion.selection.select import METHODS, SourceScore, score_sources
from coldfusion.selection.settings import SelectionSettings
from coldfusion.tasks import Task, TaskSpec, load_task


def task_argument(text: str) -> Task:
    """A built-in task name, or a task file (csv / tsv / jsonl / parquet, split 70/10/20)."""
    path = Path(text)
    return load_task(TaskSpec(name=path.stem, path=path) if path.is_file() else TaskSpec(name=text))


def rank(target: str, candidates: list[str], s: SelectionSettings, cache: Path, by: str = "logme",
         top_k: int = 0, base: str | None = "default", progress=None) -> list[Ranked]:
    if by not in SCORES:
        raise ColdFusionError(f"rank by one of {', '.join(SCORES)}, not '{by}'")
    use_compute(s)
    encoders, task = Encoders(), task_argument(target)
    bodies = [load_candidate(c, encoders) for c in candidates]
    base_body = load_candidate(base, encoders) if top_k and base else None
    return rank_candidates(task, bodies, s, Repository(cache), encoders, by, top_k, base_body,
                           progress or SilentProgress())


def select(target: str, sources: list[str], s: SelectionSettings, cache: Path, by: str = "logme",
           base: str = "default", progress=None) -> list[SourceScore]:
    if by not in METHODS:
        raise ColdFusionError(f"select by one of {', '.join(METHODS)}, not '{by}'")
    use_compute(s)
    encoders = Encoders()
    scored = score_sources(task_argument(target), [task_argument(t) for t in sources], load_candidate(base, encoders),
                           s, Repository(cache), encoders, progress or SilentProgress())
    return sorted(scored, key=lambda r: r.score(by), reverse=True)
