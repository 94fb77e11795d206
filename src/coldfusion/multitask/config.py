"""`coldfusion multitask` configs (light: pydantic only, so a bad config is reported at once)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coldfusion.configfile import format_validation_error, read_yaml_mapping
from coldfusion.errors import ColdFusionError
from coldfusion.names import SafeName
from coldfusion.tasks import TaskSpec
from coldfusion.training.settings import ComputeSettings, FinetuneSettings


class MultitaskSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sampler: Literal["proportional", "uniform", "temperature", "uncertainty", "adaptive"] = "temperature"
    sampler_params: dict = Field(default_factory=dict, description="e.g. {temperature: 2} for `temperature`")
    steps: int = Field(300, ge=1, description="optimizer steps (the training budget)")
    candidates_per_task: int | None = Field(
        None, ge=1, description="`uncertainty`: candidate examples drawn from every task per step; default batch size")
    heldout_per_task: int = Field(8, ge=1, description="`adaptive`: validation examples per task for the reward")
    optimizer: FinetuneSettings = FinetuneSettings()


class MultitaskConfig(ComputeSettings):
    name: SafeName = "multitask"
    seed: int = 0
    model: str = Field("default", description="'default' (bundled MiniLM), a model directory or a hub id")
    max_length: int = Field(64, ge=8)
    pooling: Literal["mean", "cls"] = "mean"
    tasks: list[TaskSpec] = Field(min_length=1)
    train_examples: int | None = Field(None, ge=1, description="cap on each task's training examples")
    validation_examples: int = Field(200, ge=1)
    multitask: MultitaskSettings = MultitaskSettings()
    output_dir: Path = Path("runs")
    repository: Path | None = Field(None, description="repository directory; default: <run dir>/repository")


def load_multitask_config(path: Path) -> MultitaskConfig:
    try:
        config = MultitaskConfig.model_validate(read_yaml_mapping(path))
    except ValidationError as exc:
        raise ColdFusionError(format_validation_error(exc, str(path))) from None
    s = config.multitask
    if s.sampler != "uncertainty":  # unknown sampler parameters fail now, not after loading data
        from coldfusion.multitask.samplers import make_sampler

        try:
            make_sampler(s.sampler, [1] * len(config.tasks), **s.sampler_params)
        except ColdFusionError as exc:
            raise ColdFusionError(f"{path}: 'multitask': {exc}") from None
    return config
