"""The local engine: every contributor lives and trains in this process, one after another."""

from pathlib import Path

from coldfusion.checkpoint import Tensors, load_tensors, save_tensors
from coldfusion.collab.contributor import Contributor
from coldfusion.collab.round import RoundResult
from coldfusion.config import RunConfig
from coldfusion.encoder import Encoder
from coldfusion.fusion import get_operator
from coldfusion.tasks import Task


def make_contributor(config: RunConfig, task: Task, encoder: Encoder, head: Tensors | None = None) -> Contributor:
    """The contributor that holds `task`, with the settings of the run (any engine builds it so)."""
    return Contributor(
        task, encoder, finetune_settings=config.finetune, max_length=config.max_length, pooling=config.pooling,
        examples_per_iteration=config.loop.examples_per_contributor,
        validation_examples=config.loop.validation_examples, keep_head=config.loop.keep_head, seed=config.seed,
        head=head, statistics=get_operator(config.fusion.method).needs_stats,  # what the fusion needs them to send
        statistics_examples=config.fusion.statistics_examples, encoding=config.contribution)


class LocalEngine:
    name = "local"

    def __init__(self, config: RunConfig, tasks: list[Task], encoder: Encoder, heads_dir: Path):
        """One contributor per seen task, with the head it saved in `heads_dir` (if any)."""
        def head(task: Task):
            path = heads_dir / f"{task.name}.safetensors"
            return load_tensors(path) if path.exists() else None

        self.contributors = {t.name: make_contributor(config, t, encoder, head(t)) for t in tasks}

    @property
    def contributor_names(self) -> list[str]:
        return list(self.contributors)

    def run_round(self, base: Tensors, iteration: int, names: list[str], progress) -> RoundResult:
        chosen = [self.contributors[n] for n in names]
        progress.phase(f"iteration {iteration}: finetuning {len(chosen)} contributors",
                       sum(len(c.examples_for(iteration)) for c in chosen))
        return RoundResult([c.contribute(base, iteration, on_step=progress.advance) for c in chosen])

    def save_heads(self, heads_dir: Path) -> None:
        """Heads are contributor state: a snapshot per iteration lets a resumed run continue exactly."""
        for c in self.contributors.values():
            if c.head is not None:
                save_tensors(heads_dir / f"{c.name}.safetensors", c.head)
