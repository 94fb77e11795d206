"""What belongs to one contributor's node and never leaves it: its task, model copy,
device, precision, threads, local overrides, and the directory where its head survives restarts.

On Flower these come from the SuperNode's node config (`--node-config "task='t.yaml'
device='cuda' precision='bf16' threads=8 state-dir='/srv/cf'"`); the local engine and the simulation
build them from the run's one YAML file. The consortium's settings (collab/consortium.py)
arrive with every base; a node may override only settings that change how it computes,
not what the consortium asked of it: `batch-size` (finetune.batch_size, what fits its
memory) and `eval-batch-size` (feature extraction; scores do not depend on it).
"""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from coldfusion.infra.errors import ColdFusionError
from coldfusion.tasks import TaskSpec


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "coldfusion" / "node"


class NodeSettings(BaseModel):
    """A node's own settings; the field aliases are its Flower node config keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    task: str | TaskSpec | None = Field(
        None, description="a built-in task name, or a YAML file holding one task spec (a spec itself in simulation)")
    contributor: str | None = Field(
        None, description="the name this node takes part under (default: its task's name); the server knows it "
                          "even when the task file is broken, and reports the node as missing with the reason")
    model: str | None = Field(
        None, description="this node's copy of the consortium's model (a directory); needed when the "
                          "consortium's model is a directory on the server")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    precision: str = Field("auto", description="auto (bf16 where the device multiplies it natively), fp32, bf16 "
                                               "or fp16")
    threads: int | None = Field(None, ge=1, description="torch threads; default: the cores this process may use")
    state_dir: Path | None = Field(
        None, alias="state-dir", description="where this node keeps its task heads across rounds, restarts and "
                                             "resumed runs (default: ~/.local/state/coldfusion/node)")
    last_round: int | None = Field(
        None, ge=0, alias="last-round", description="the last round of a run this node trains in; it declines "
                                                    "later ones (a node with a budget)")
    audit_log: Path | None = Field(
        None, alias="audit-log", description="a JSON-lines file where the node writes down every message it "
                                             "receives and every reply it sends (record names, settings, metrics, "
                                             "tensor names, dtypes and shapes): what crossed the line")
    batch_size: int | None = Field(None, ge=1, alias="batch-size")
    eval_batch_size: int | None = Field(None, ge=1, alias="eval-batch-size")

    @field_validator("contributor", "model", "device", "precision", mode="before")
    @classmethod
    def _text(cls, value):
        return None if value is None else str(value)

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, value):
        return value if value is None or isinstance(value, dict | TaskSpec) else str(value)

    @classmethod
    def from_node_config(cls, node_config: dict) -> "NodeSettings":
        """From a SuperNode's node config; errors name the key (Flower adds `partition-id` and
        `num-partitions` in simulation: they are not ours and are ignored). A SuperNode keeps
        its heads in `default_state_dir()` unless it names a `state-dir`."""
        ours = {k: v for k, v in node_config.items() if k not in ("partition-id", "num-partitions")}
        ours.setdefault("state-dir", default_state_dir())
        try:
            return cls.model_validate(ours)
        except ValidationError as exc:
            problems = "; ".join(
                f"unknown key {'.'.join(map(str, e['loc']))!r} (known: {', '.join(sorted(NODE_CONFIG_KEYS))})"
                if e["type"] == "extra_forbidden" else f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in exc.errors())
            raise ColdFusionError(f"node config: {problems}") from None


NODE_CONFIG_KEYS = {f.alias or name for name, f in NodeSettings.model_fields.items()}
