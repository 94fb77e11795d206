"""The ClientApp: a SuperNode is one contributor, training and scoring on data that never leaves it.

What the node holds comes from its node config (`NodeSettings`: `task`, `contributor`,
`model`, `device`, `threads`, `state-dir`, `last-round`, `batch-size`,
`eval-batch-size`); what the consortium fixes comes with each message
(`ConsortiumSettings`). In simulation, `client_app_for` gives each simulated node (by
its `partition-id`) the node settings that the run's one YAML file describes.

Three handlers: `query` (which contributor is this node?), `train` (finetune the base,
send the body back, or decline) and `evaluate` (score a base on the node's own task,
send numbers back). An error on the node is logged there in full and answered with a
reason that names no path of the node's. With node config `audit-log`, the node writes
down every message it receives and every reply it sends.
"""

import json
import re
import time
import traceback
from collections.abc import Callable
from logging import ERROR
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.constant import ErrorCode
from pydantic import ValidationError

from coldfusion.collab.consortium import ConsortiumSettings, contributor_for, node_model
from coldfusion.collab.flower.messages import (
    ARRAYS,
    CONFIG,
    contribution_content,
    declined_content,
    from_record,
    read_consortium,
    scores_content,
)
from coldfusion.collab.node import NodeSettings
from coldfusion.infra.config_files import format_validation_error
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.runtime import resolve_threads, set_threads
from coldfusion.models.encoder import Encoder
from coldfusion.tasks import TaskSpec, load_task

NodeSettingsOf = Callable[[Context], NodeSettings]


def deployment_node(context: Context) -> NodeSettings:
    """A SuperNode's settings: its node config."""
    return NodeSettings.from_node_config(dict(context.node_config))


def node_task(node: NodeSettings) -> TaskSpec:
    """The task spec this node holds; errors name the node config key and the file."""
    if node.task is None:
        raise ColdFusionError("this SuperNode has no task: start it with --node-config \"task='NAME_OR_SPEC.yaml'\"")
    if isinstance(node.task, TaskSpec):  # simulation: the run's one YAML file gave it
        return node.task
    if not node.task.endswith((".yaml", ".yml")):
        return TaskSpec.model_validate(node.task)  # a built-in task's name
    path = Path(node.task)
    where = f"node config task={node.task!r}"
    if not path.is_file():
        raise ColdFusionError(f"{where}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ColdFusionError(f"{where}: cannot read the task spec: {exc}") from None
    if not isinstance(data, dict):
        raise ColdFusionError(f"{where}: a task spec is a YAML mapping ({{name: ..., path: ...}}), "
                              f"not a {type(data).__name__}")
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        raise ColdFusionError(format_validation_error(exc, where)) from None


def _private_paths(node: NodeSettings | None) -> dict[str, str]:
    """The node's own paths, each with the node config key that names it."""
    if node is None:
        return {}
    paths = {node.model: "model", node.state_dir and str(node.state_dir): "state-dir"}
    if isinstance(node.task, TaskSpec):
        paths.update({str(p): "task" for p in (node.task.path, node.task.train, node.task.validation,
                                               node.task.test) if p})
    else:
        paths[node.task] = "task"
    return {p: key for p, key in paths.items() if p and ("/" in p or p.endswith((".yaml", ".yml")))}


def public_reason(text: str, node: NodeSettings | None) -> str:
    """An error's text for the server: `key='PATH'` becomes `key`, the node's other paths
    `(the file of node config KEY)`, any other absolute path `(a path on the node)`."""
    for path, key in sorted(_private_paths(node).items(), key=lambda kv: -len(kv[0])):
        for form in dict.fromkeys((path, str(Path(path).resolve()))):
            text = text.replace(f"{key}={form!r}", key).replace(form, f"(the file of node config {key})")
    return re.sub(r"(?<![\w.])/[^\s'\"(),:]+", "(a path on the node)", text)


# What this process built for the current run. Module state, not the ClientApp's: a
# simulation's worker process serves several nodes and rounds but receives the ClientApp
# anew with every message (a deployment starts a process per message).
_BUILT: dict = {}


def _contributor(consortium: ConsortiumSettings, node: NodeSettings):
    """This node's contributor for this run, built once per process (its nodes share one
    loaded encoder): the task is loaded and tokenized once, not at every message."""
    built, run = _BUILT, consortium.model_dump_json()
    if built.get("run") != run:
        built.update(run=run, encoders={}, contributors={})
    key = node.model_dump_json()
    if key not in built["contributors"]:
        model = node_model(consortium, node)
        if model not in built["encoders"]:
            built["encoders"][model] = Encoder.load(model)
        built["contributors"][key] = contributor_for(consortium, node, load_task(node_task(node)),
                                                     built["encoders"][model])
    return built["contributors"][key]


def describe(msg: Message) -> dict:
    """What a message carries, for an audit log: its records' names and settings, its metrics,
    its tensors' names, dtypes and shapes (not their values), or its error."""
    if msg.has_error():
        return {"error": msg.error.reason}
    content = msg.content
    return {"config": {name: {k: v if isinstance(v, int | float | bool) else str(v) for k, v in record.items()}
                       for name, record in content.config_records.items()},
            "metrics": {name: dict(record) for name, record in content.metric_records.items()},
            "arrays": {name: {k: [a.dtype, list(a.shape)] for k, a in record.items()}
                       for name, record in content.array_records.items()}}


def _audit_mod(settings_of: NodeSettingsOf):
    """A Flower mod that writes down, when the node's config asks for it, what crossed the line."""
    def audit(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        try:
            path = settings_of(context).audit_log
        except ColdFusionError:  # a broken node config: the handler has answered with the error
            return reply
        if path is not None:
            entries = [{"time": time.time(), "direction": direction, "type": msg.metadata.message_type,
                        **describe(m)} for direction, m in (("received", msg), ("sent", reply))]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.writelines(json.dumps(e) + "\n" for e in entries)
        return reply
    return audit


def _serve(settings_of: NodeSettingsOf, mods: list | None = None) -> ClientApp:
    app = ClientApp(mods=[_audit_mod(settings_of), *(mods or [])])

    def settings(context: Context) -> NodeSettings:
        node = settings_of(context)
        set_threads(resolve_threads(node.threads))
        return node

    def guarded(handler):
        def run(msg: Message, context: Context) -> Message:
            node = None
            try:
                node = settings(context)
                return handler(msg, node)
            except Exception as exc:  # every failure is answered, none names the node's paths
                detail = str(exc) if isinstance(exc, ColdFusionError) else traceback.format_exc()
                log(ERROR, "this contributor could not serve a %s message: %s", msg.metadata.message_type, detail)
                reason = str(exc) if isinstance(exc, ColdFusionError) else \
                    f"{type(exc).__name__} on the node (the details are in its log)"
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=public_reason(reason, node)),
                               reply_to=msg)
        return run

    @app.query()
    @guarded
    def identify(msg: Message, node: NodeSettings) -> Message:
        """Which contributor this node is. A node whose task cannot be read but that names its
        contributor still answers, with the problem, so the server can report it."""
        try:
            spec = node_task(node)
            name, problem = node.contributor or spec.name, None
            if name != spec.name:
                problem = f"node config contributor={name!r}, but its task is named {spec.name!r}"
            load_task(spec)  # a task that cannot be loaded fails now, at the start of the run
        except ColdFusionError as exc:
            if node.contributor is None:
                raise
            log(ERROR, "%s", exc)
            name, problem = node.contributor, public_reason(str(exc), node)
        answer = {"name": name, **({"problem": problem} if problem else {})}
        return Message(RecordDict({"contributor": ConfigRecord(answer)}), reply_to=msg)

    @app.train()
    @guarded
    def train(msg: Message, node: NodeSettings) -> Message:
        """Finetune the base on this node's task; send back the body (never the data or the head)."""
        consortium, iteration = read_consortium(msg.content.config_records[CONFIG])
        contributor = _contributor(consortium, node)
        base = from_record(msg.content.array_records[ARRAYS])
        reason = contributor.declines(base, iteration)
        if reason is not None:
            return Message(declined_content(reason), reply_to=msg)
        return Message(contribution_content(contributor.contribute(base, iteration)), reply_to=msg)

    @app.evaluate()
    @guarded
    def evaluate(msg: Message, node: NodeSettings) -> Message:
        """Score the base on this node's own task; send back numbers only."""
        consortium, _ = read_consortium(msg.content.config_records[CONFIG])
        contributor = _contributor(consortium, node)
        return Message(scores_content(contributor.evaluate(from_record(msg.content.array_records[ARRAYS]))),
                       reply_to=msg)

    return app


def client_app_for(nodes: list[NodeSettings], mods: list | None = None) -> ClientApp:
    """A ClientApp whose simulated node `partition-id` i holds `nodes[i]` (simulation), with
    Flower mods (`mods`) around its handlers."""
    return _serve(lambda context: nodes[int(context.node_config["partition-id"])], mods)


app = _serve(deployment_node)
