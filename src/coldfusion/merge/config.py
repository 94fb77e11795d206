"""The merge config: which checkpoints, which fusion method, where the result goes."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from coldfusion.fusion import get_operator
from coldfusion.infra.config_files import ConfigSection, load_config_file
from coldfusion.infra.errors import ColdFusionError


class MergeInput(ConfigSection):
    model: str = Field(description="a model directory (or hub id)")
    weight: float = Field(1.0, ge=0)


class MergeConfig(ConfigSection):
    method: str = "average"
    params: dict = Field(default_factory=dict)
    base_model: str | None = Field(None, description="needed by task-vector methods and by heads: keep_base")
    models: list[MergeInput] = Field(min_length=1)
    heads: Literal["drop", "keep_base"] = "drop"
    output: Path
    overwrite: bool = False
    allow_pickle: bool = Field(False, description="UNSAFE: also read pytorch_model.bin (pickle can run code)")


def load_merge_config(path: Path) -> MergeConfig:
    config = load_config_file(path, MergeConfig)
    try:
        get_operator(config.method).check_params(config.params)
    except ColdFusionError as exc:
        raise ColdFusionError(f"{path}: {exc}") from None
    return config
