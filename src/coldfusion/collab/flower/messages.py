"""What travels between the ServerApp and the ClientApps, and nothing else.

Down (train and evaluate messages): the base body and the consortium's settings
(`ConsortiumSettings`: finetune settings, encoding, statistics, evaluation protocol,
seeds, the run id) with the round. Never a task spec, a path, another contributor's name
or settings, or the `attack:` block.

Up: for train, the finetuned body as the run encodes it, the statistics the fusion
method needs, the example count (`metrics["num-examples"]`, Flower's convention), the
contributor's name and training metrics; or that it declined, and why. For evaluate,
the scores of the base on the contributor's own task: accuracy, macro-F1, the probe's
L2 and validation accuracy, and per-example correctness bits. Tensors keep their names
and dtypes exactly.
"""

import json

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from coldfusion.collab.consortium import ConsortiumSettings
from coldfusion.contributors.contributor import ContributionResult
from coldfusion.fusion.registry import STATISTICS
from coldfusion.io.checkpoint import Tensors

ARRAYS, CONFIG, METRICS, CONTRIBUTOR = "arrays", "config", "metrics", "contributor"
DECLINED, SCORES, CORRECT = "declined", "scores", "correct"
ROUND = "server-round"  # as FedAvg names it


def to_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=tensors)


def from_record(record: ArrayRecord) -> Tensors:
    return dict(record.to_torch_state_dict())


def consortium_record(settings: ConsortiumSettings, server_round: int = 0) -> ConfigRecord:
    return ConfigRecord({"consortium": settings.model_dump_json(), ROUND: server_round})


def read_consortium(record: ConfigRecord) -> tuple[ConsortiumSettings, int]:
    """(consortium settings, round) from a message's config record."""
    return ConsortiumSettings.model_validate_json(str(record["consortium"])), int(record.get(ROUND, 0))


def contribution_content(result: ContributionResult) -> RecordDict:
    records = {ARRAYS: to_record(result.body),
               METRICS: MetricRecord({"num-examples": result.num_examples}),
               CONTRIBUTOR: ConfigRecord({"name": result.contributor, "task": result.task,
                                          "metrics": json.dumps(result.metrics),
                                          "encoding": json.dumps(result.encoding)})}
    records.update({kind: to_record(tensors) for kind, tensors in result.stats.items()})
    return RecordDict(records)


def declined_content(reason: str) -> RecordDict:
    return RecordDict({DECLINED: ConfigRecord({"reason": reason})})


def read_declined(content: RecordDict) -> str | None:
    """Why the contributor declined the round, or None if it sent a contribution."""
    return str(content.config_records[DECLINED]["reason"]) if DECLINED in content.config_records else None


def read_contribution(content: RecordDict) -> ContributionResult:
    about = content.config_records[CONTRIBUTOR]
    stats = {kind: from_record(content.array_records[kind]) for kind in STATISTICS
             if kind in content.array_records}
    return ContributionResult(str(about["name"]), str(about["task"]), from_record(content.array_records[ARRAYS]),
                              int(content.metric_records[METRICS]["num-examples"]),
                              json.loads(str(about["metrics"])), stats, json.loads(str(about["encoding"])))


def scores_content(scores: dict) -> RecordDict:
    numbers = {k: float(v) for k, v in scores.items() if k != "test_correct"}
    return RecordDict({SCORES: MetricRecord(numbers),
                       CORRECT: ConfigRecord({"test_correct": str(scores["test_correct"])})})


def read_scores(content: RecordDict) -> dict:
    scores = {k: float(v) for k, v in content.metric_records[SCORES].items()}
    bits = str(content.config_records[CORRECT]["test_correct"])
    if set(bits) - {"0", "1"}:
        raise ValueError("test_correct must be a string of 0 and 1")
    return {**scores, "test_correct": bits}
