"""Reading YAML config files and reporting validation errors (light: no ML imports)."""

from pathlib import Path

import yaml
from pydantic import ValidationError

from coldfusion.errors import ColdFusionError


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
