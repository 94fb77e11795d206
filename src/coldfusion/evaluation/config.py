"""Evaluation configs: which bodies, on which tasks, by which protocols, over which seeds."""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from coldfusion.infra.config_files import ConfigSection, load_config_file
from coldfusion.infra.names import SafeName
from coldfusion.tasks import TaskSpec
from coldfusion.training.settings import EncoderSettings, FinetuneSettings, ProbeSettings


class FewShotSettings(ConfigSection):
    k: int = Field(100, ge=1, description="labelled training examples per class (all of a class with fewer), or "
                                          "per task with `per: task`")
    per: Literal["class", "task"] = Field(
        "class", description="class: k per class; task: k in all, stratified by class (the ColD Fusion publication's "
                             "100 per dataset)")
    validation_k: int | None = Field(
        None, ge=1, description="validation examples per class for early stopping; default none: fixed epochs")
    finetune: FinetuneSettings = FinetuneSettings(epochs=6)


class ProtocolSettings(ConfigSection):
    """How each protocol trains (the evaluation config extends this)."""

    probe: ProbeSettings = ProbeSettings()
    finetune: FinetuneSettings = FinetuneSettings(epochs=3)
    few_shot: FewShotSettings = FewShotSettings()


class BodySpec(ConfigSection):
    """A body to evaluate: a model (directory, hub id, 'default') or a repository version."""

    name: str
    model: str | None = Field(None, description="'default', a model directory or a hub id")
    repository: Path | None = Field(None, description="a coldfusion repository directory")
    version: str = Field("latest", description="with `repository`: 'latest', 'v3', 3 or a checksum prefix")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.repository is None):
            raise ValueError(f"body '{self.name}': give exactly one of `model` or `repository`")
        return self


class EvalConfig(ProtocolSettings, EncoderSettings):
    name: SafeName = "evaluation"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    bodies: list[BodySpec] = Field(min_length=1)
    reference: str | None = Field(None, description="the body gains are measured against; default the first")
    tasks: list[TaskSpec] = Field(min_length=1)
    protocols: list[Literal["linear_probe", "finetune", "few_shot"]] = Field(
        default_factory=lambda: ["linear_probe"], min_length=1)
    train_examples: int | None = Field(None, ge=1, description="cap on training examples (finetune, probe)")
    validation_examples: int | None = Field(500, ge=1)
    test_examples: int | None = Field(None, ge=1, description="cap on test examples; default all of them")
    held_out: Literal["test", "validation"] = Field(
        "test", description="the split bodies are scored on; 'validation' for tuning (early-stopping examples "
        "then come from the end of train), so that settings are never chosen on test")
    output_dir: Path = Path("runs")

    @model_validator(mode="after")
    def _names(self):
        names = [b.name for b in self.bodies]
        if len(set(names)) != len(names):
            raise ValueError(f"body names must be unique: {names}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference '{self.reference}' is not one of the bodies {names}")
        tasks = [t.name for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique: {tasks}")
        return self

    @property
    def reference_body(self) -> str:
        return self.reference or self.bodies[0].name


def load_eval_config(path: Path) -> EvalConfig:
    return load_config_file(path, EvalConfig)
