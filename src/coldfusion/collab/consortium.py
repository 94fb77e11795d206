"""What the consortium fixes for every contributor, and nothing more: the settings that
travel to each node with the base.

`ConsortiumSettings` is everything a node receives besides the base: how to finetune,
what to send back (encoding, statistics), how to score a base on its own task, and the
seeds. Never a task spec, a path, another contributor's name or settings, or the
`attack:` block. `contributor_for` joins it with what the node holds itself (its task,
model copy, device, threads, head directory and allowed overrides; collab/node.py):
every engine builds its contributors through it, so all of them train alike.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field

from coldfusion.collab.config import RunConfig
from coldfusion.collab.node import NodeSettings
from coldfusion.contributors.contributor import Contributor
from coldfusion.contributors.heads import HeadStore
from coldfusion.encodings import EncodingSettings
from coldfusion.infra.config_files import ConfigSection
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.names import check_name
from coldfusion.infra.runtime import resolve_compute
from coldfusion.models.encoder import Encoder
from coldfusion.tasks import Task
from coldfusion.training import FinetuneSettings
from coldfusion.training.probe import ProbeProtocol


class ConsortiumSettings(ConfigSection):
    run_id: str = Field(description="identifies the run, so a node keeps its heads per run")
    seed: int
    model: str | None = Field(description="'default' or a hub id; None when the consortium's model is a directory "
                                          "on the server (each node then names its own copy)")
    max_length: int
    pooling: Literal["mean", "cls"]
    examples_per_round: int | None
    validation_examples: int
    keep_head: bool
    finetune: FinetuneSettings
    contribution: EncodingSettings
    statistics: Literal["fisher", "gram"] | None = Field(description="what the fusion method needs sent back")
    statistics_examples: int
    evaluation: ProbeProtocol

    @classmethod
    def of_run(cls, config: RunConfig, run_id: str) -> "ConsortiumSettings":
        from coldfusion.fusion import get_operator

        local_model = Path(config.model).is_dir()  # a path on the server means nothing on a node
        return cls(
            run_id=run_id, seed=config.seed, model=None if local_model else config.model,
            max_length=config.max_length, pooling=config.pooling,
            examples_per_round=config.loop.examples_per_contributor,
            validation_examples=config.loop.validation_examples, keep_head=config.loop.keep_head,
            finetune=config.finetune, contribution=config.contribution,
            statistics=get_operator(config.fusion.method).needs_stats,
            statistics_examples=config.fusion.statistics_examples,
            evaluation=ProbeProtocol(**config.evaluation.model_dump(include=set(ProbeProtocol.model_fields))))


def node_model(consortium: ConsortiumSettings, node: NodeSettings) -> str:
    """The model this node loads: its own copy if it names one, else the consortium's."""
    model = node.model or consortium.model
    if model is None:
        raise ColdFusionError("the consortium's model is a directory on the server: give this node its own copy "
                              "with --node-config \"model='DIR'\"")
    return model


def contributor_for(consortium: ConsortiumSettings, node: NodeSettings, task: Task, encoder: Encoder) -> Contributor:
    """The contributor that holds `task` on this node, with the consortium's settings and
    the node's own device, precision, head directory and overrides."""
    finetune = consortium.finetune
    if node.batch_size:
        finetune = finetune.model_copy(update={"batch_size": node.batch_size})
    evaluation = consortium.evaluation
    if node.eval_batch_size:
        evaluation = evaluation.model_copy(
            update={"probe": evaluation.probe.model_copy(update={"batch_size": node.eval_batch_size})})
    try:
        compute = resolve_compute(node.device, node.precision, node.threads)
    except ValueError as exc:
        raise ColdFusionError(f"node config: {exc}") from None
    head_store = None
    if consortium.keep_head and node.state_dir is not None:
        head_store = HeadStore(Path(node.state_dir) / check_name(consortium.run_id, "run id")
                          / check_name(task.name, "contributor"))
    return Contributor(
        task, encoder, finetune_settings=finetune, max_length=consortium.max_length, pooling=consortium.pooling,
        examples_per_iteration=consortium.examples_per_round, validation_examples=consortium.validation_examples,
        keep_head=consortium.keep_head, seed=consortium.seed, statistics=consortium.statistics,
        statistics_examples=consortium.statistics_examples, encoding=consortium.contribution, head_store=head_store,
        device=compute.device, compute_dtype=compute.dtype, evaluation=evaluation, last_round=node.last_round)
