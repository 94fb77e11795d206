"""The local engine: every contributor lives, trains and scores in this process, one after another.

Its contributors are built exactly as a Flower node builds its own (`contributor_for`):
the consortium's settings, plus node settings taken from the run (its device, precision,
threads and model, heads under `<run dir>/heads/`).
"""

from pathlib import Path

from coldfusion.collab.config import RunConfig
from coldfusion.collab.consortium import ConsortiumSettings, contributor_for
from coldfusion.collab.node import NodeSettings
from coldfusion.collab.round import EvaluationRound, RoundResult
from coldfusion.io.checkpoint import Tensors
from coldfusion.models.encoder import Encoder
from coldfusion.tasks import Task, TaskSpec


def run_node(config: RunConfig, heads_dir: Path, task: TaskSpec | None = None) -> NodeSettings:
    """The node settings of a contributor on this machine (local engine, simulation): the
    run's model, device, precision and threads, heads under `heads_dir`."""
    return NodeSettings(task=task, model=config.model, device=config.device, precision=config.precision,
                        threads=None if config.threads == "auto" else config.threads, state_dir=heads_dir)


class LocalEngine:
    name = "local"

    def __init__(self, config: RunConfig, tasks: list[Task], encoder: Encoder, heads_dir: Path, run_id: str):
        """One contributor per seen task; heads are kept under `heads_dir`."""
        consortium = ConsortiumSettings.of_run(config, run_id)
        node = run_node(config, heads_dir)
        self.contributors = {t.name: contributor_for(consortium, node, t, encoder) for t in tasks}

    @property
    def contributor_names(self) -> list[str]:
        return list(self.contributors)

    def run_round(self, base: Tensors, iteration: int, names: list[str], progress) -> RoundResult:
        declined = {n: why for n in names if (why := self.contributors[n].declines(base, iteration))}
        chosen = [self.contributors[n] for n in names if n not in declined]
        progress.phase(f"iteration {iteration}: finetuning {len(chosen)} contributors",
                       sum(len(c.examples_for(iteration)) for c in chosen))
        return RoundResult([c.contribute(base, iteration, on_step=progress.advance) for c in chosen],
                           declined=declined)

    def evaluate(self, body: Tensors, iteration: int, progress) -> EvaluationRound:
        progress.phase(f"iteration {iteration}: contributors score the base on their own tasks",
                       sum(c.num_evaluation_examples() for c in self.contributors.values()))
        return EvaluationRound({n: c.evaluate(body, on_step=progress.advance) for n, c in self.contributors.items()})
