"""`coldfusion multitask` configs (light: pydantic only, so a bad config is reported at once)."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from coldfusion.infra.config_files import ConfigSection, load_config_file
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.names import SafeName
from coldfusion.tasks import TaskSpec
from coldfusion.training.settings import ExperimentSettings, FinetuneSettings


class CaMtlSettings(ConfigSection):
    """CA-MTL's conditioning (models/ca_mtl.py)."""
    task_dim: int = Field(64, ge=1, description="size of the learned task embedding")
    attention_blocks: int = Field(4, ge=1, description="blocks of the conditional attention term (of max_length)")
    adapter_ratio: int = Field(3, ge=1, description="the top adapter's bottleneck is hidden / adapter_ratio")


class MultitaskSettings(ConfigSection):
    model: Literal["shared", "ca_mtl"] = Field(
        "shared", description="`shared`: one body, a head per task; `ca_mtl`: the body wrapped in CA-MTL's task "
                              "conditioning (bottom half frozen)")
    ca_mtl: CaMtlSettings = CaMtlSettings()
    sampler: Literal["proportional", "uniform", "temperature", "uncertainty", "mometas"] = "temperature"
    sampler_params: dict = Field(default_factory=dict, description="e.g. {temperature: 2} for `temperature`; "
                                 "{every: 100, lr: 0.1, entropy_weight: 2} for `mometas`")
    steps: int = Field(300, ge=1, description="optimizer steps (the training budget)")
    candidates_per_task: int | None = Field(
        None, ge=1, description="`uncertainty`: candidate examples drawn from every task per step; default batch size")
    heldout_per_task: int = Field(
        64, ge=1, description="`mometas`: validation examples per task whose loss makes the reward")
    optimizer: FinetuneSettings = FinetuneSettings()


class MultitaskConfig(ExperimentSettings):
    name: SafeName = "multitask"
    tasks: list[TaskSpec] = Field(min_length=1)
    train_examples: int | None = Field(None, ge=1, description="cap on each task's training examples")
    validation_examples: int = Field(200, ge=1)
    multitask: MultitaskSettings = MultitaskSettings()
    output_dir: Path = Path("runs")
    repository: Path | None = Field(None, description="repository directory; default: <run dir>/repository")


def load_multitask_config(path: Path) -> MultitaskConfig:
    config = load_config_file(path, MultitaskConfig)
    s = config.multitask
    if s.sampler != "uncertainty":  # unknown sampler parameters fail now, not after loading data
        from coldfusion.multitask.samplers import make_sampler

        try:
            make_sampler(s.sampler, [1] * len(config.tasks), **s.sampler_params)
        except ColdFusionError as exc:
            raise ColdFusionError(f"{path}: 'multitask': {exc}") from None
    return config
