"""Config files: YAML read, checked by pydantic, and every problem reported in one format
that names the file and the key. Every config loader goes through `load_config_file`
(light: no ML imports, so a bad config is reported before torch loads)."""

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from coldfusion.infra.errors import ColdFusionError

Config = TypeVar("Config", bound=BaseModel)


class ConfigSection(BaseModel):
    """A config or a section of one: an unknown key is an error (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if not where:  # a check across fields: its message names them; echoing the whole config would not help
        return message
    return f"'{where}': {message} (got {error.get('input')!r})"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
    return f"{source}: invalid config:\n{lines}"


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file that must hold a mapping; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ColdFusionError(f"config file {path} does not exist")
    if not path.is_file():
        raise ColdFusionError(f"config file {path} is a directory, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ColdFusionError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a config is YAML") from None
    except OSError as exc:
        raise ColdFusionError(f"{path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ColdFusionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ColdFusionError(f"{path}: a config is a YAML mapping of keys, not a {type(data).__name__}")
    return data


def validate_config(model: type[Config], data, source: str) -> Config:
    """`data` checked as a `model`; every problem in one error that names `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ColdFusionError(format_validation_error(exc, source)) from None


def load_config_file(path: Path, model: type[Config]) -> Config:
    """The YAML file at `path`, checked as a `model`."""
    return validate_config(model, read_yaml_mapping(path), str(path))

