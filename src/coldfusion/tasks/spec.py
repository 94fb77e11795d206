"""How a config names a task: a built-in name, a local file, or a Hugging Face dataset."""

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from coldfusion.infra.config_files import ConfigSection
from coldfusion.infra.names import SafeName


class TaskSpec(ConfigSection):
    """A task in a config. A bare string in YAML means a built-in task of that name."""

    name: SafeName
    path: Path | None = None  # one file, split 70/10/20 deterministically
    train: Path | None = None
    validation: Path | None = None
    test: Path | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_splits: dict[Literal["train", "validation", "test"], str] | None = Field(
        None, description="which of the dataset's splits are train / validation / test when their names differ "
                          "(MNLI: {validation: validation_matched}); the others are ignored")
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self):
        sources = [self.path is not None, self.train is not None, self.hf_dataset is not None]
        if sum(sources) > 1:
            raise ValueError("give only one of `path`, `train` (+ validation/test) or `hf_dataset`")
        if self.hf_splits is not None and self.hf_dataset is None:
            raise ValueError("`hf_splits` names the splits of an `hf_dataset`")
        return self

    @property
    def is_builtin(self) -> bool:
        return self.path is None and self.train is None and self.hf_dataset is None
