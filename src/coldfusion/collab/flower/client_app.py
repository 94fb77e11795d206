"""The ClientApp: a SuperNode is one contributor, training on data that never leaves it.

Its task: node config `task` (a built-in task name, or a YAML file holding one task spec
as in a run config), or, in simulation, its `partition-id` into the run's tasks. Its head
is kept in the node's state (`context.state`) from one round to the next.
"""

from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from coldfusion.collab.flower.messages import (
    ARRAYS,
    CONFIG,
    contribution_content,
    from_record,
    read_settings,
    to_record,
)
from coldfusion.collab.local_engine import make_contributor
from coldfusion.config import RunConfig
from coldfusion.encoder import Encoder
from coldfusion.errors import ColdFusionError
from coldfusion.runtime import set_threads
from coldfusion.tasks import TaskSpec, load_task

HEAD = "head"
app = ClientApp()

# What this process built for the current run: a simulation keeps its ClientApp processes
# across rounds (each may serve several nodes), so every task is tokenized once and the
# encoder is loaded once.
_built: dict = {"run": None, "encoder": None, "contributors": {}}


def node_task(context: Context, config: RunConfig) -> TaskSpec:
    """The task this node holds."""
    task = context.node_config.get("task")
    if task is not None:
        task = str(task)
        if task.endswith((".yaml", ".yml")):
            path = Path(task)
            if not path.is_file():
                raise ColdFusionError(f"node config task={task!r}: no such file")
            return TaskSpec.model_validate(yaml.safe_load(path.read_text()))
        return TaskSpec.model_validate(task)
    if "partition-id" in context.node_config:  # simulation: node i holds the run's task i
        return config.tasks[int(context.node_config["partition-id"])]
    raise ColdFusionError("this SuperNode has no task: start it with --node-config \"task='NAME_OR_SPEC.yaml'\"")


def _contributor(config: RunConfig, context: Context):
    if _built["run"] != context.run_id:  # one run at a time per process
        _built.update(run=context.run_id, encoder=Encoder.load(config.model), contributors={})
    contributors = _built["contributors"]
    if context.node_id not in contributors:
        contributors[context.node_id] = make_contributor(config, load_task(node_task(context, config)),
                                                         _built["encoder"])
    return contributors[context.node_id]


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which contributor this node is (so the ServerApp can address it by name)."""
    config, _ = read_settings(msg.content.config_records[CONFIG])
    spec = node_task(context, config)
    return Message(RecordDict({"contributor": ConfigRecord({"name": spec.name})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Finetune the base on this node's task; send back the body (never the data or the head)."""
    config, iteration = read_settings(msg.content.config_records[CONFIG])
    set_threads(config.threads)
    contributor = _contributor(config, context)
    contributor.head = from_record(context.state.array_records[HEAD]) if HEAD in context.state.array_records else None
    result = contributor.contribute(from_record(msg.content.array_records[ARRAYS]), iteration)
    context.state[HEAD] = to_record(contributor.head)
    return Message(contribution_content(result), reply_to=msg)
