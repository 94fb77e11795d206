"""What travels between the ServerApp and the ClientApps, as Flower records.

Out: the base body (`arrays`) and the run's settings (`config`: the run config as YAML
and the round). Back: the finetuned body as the run encodes it (and the encoding), the
statistics the fusion method needs, the example count (`metrics["num-examples"]`,
Flower's convention) and the contributor's name and training metrics. Tensors keep their
names and dtypes exactly.
"""

import json

import yaml
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from coldfusion.checkpoint import Tensors
from coldfusion.collab.contributor import ContributionResult
from coldfusion.config import RunConfig, dump_config, parse_config
from coldfusion.fusion.registry import STATISTICS

ARRAYS, CONFIG, METRICS, CONTRIBUTOR = "arrays", "config", "metrics", "contributor"


def to_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=tensors)


def from_record(record: ArrayRecord) -> Tensors:
    return dict(record.to_torch_state_dict())


def settings_record(config: RunConfig) -> ConfigRecord:
    """The run's settings; the round (= iteration) is added as `server-round`, as FedAvg does."""
    return ConfigRecord({"run-config": dump_config(config)})


def read_settings(record: ConfigRecord) -> tuple[RunConfig, int]:
    """(run config, round) from a message's config record (round 0 outside training)."""
    config = parse_config(yaml.safe_load(str(record["run-config"])), "the run config the ServerApp sent")
    return config, int(record.get("server-round", 0))


def contribution_content(result: ContributionResult) -> RecordDict:
    records = {ARRAYS: to_record(result.body),
               METRICS: MetricRecord({"num-examples": result.num_examples}),
               CONTRIBUTOR: ConfigRecord({"name": result.contributor, "task": result.task,
                                          "metrics": json.dumps(result.metrics),
                                          "encoding": json.dumps(result.encoding)})}
    records.update({kind: to_record(tensors) for kind, tensors in result.stats.items()})
    return RecordDict(records)


def read_contribution(content: RecordDict) -> ContributionResult:
    about = content.config_records[CONTRIBUTOR]
    stats = {kind: from_record(content.array_records[kind]) for kind in STATISTICS
             if kind in content.array_records}
    return ContributionResult(str(about["name"]), str(about["task"]), from_record(content.array_records[ARRAYS]),
                              int(content.metric_records[METRICS]["num-examples"]),
                              json.loads(str(about["metrics"])), stats, json.loads(str(about["encoding"])))
