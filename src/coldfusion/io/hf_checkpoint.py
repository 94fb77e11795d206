"""Hugging Face checkpoint directories read as bodies: weight files (safetensors, sharded or
not; a pickle only when the user trusts it), config.json, and the prefix under which a
task model stores its body ("bert.", "roberta.", ...). `merge` and uploads read through it."""

import json
from pathlib import Path

import torch

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import save_tensors
from coldfusion.io.model_files import safetensors_files
from coldfusion.io.tensorfile import SafetensorsReader


def pickle_to_safetensors(pickle: Path, scratch: Path) -> Path:
    """A trusted pickled state dict, loaded with `weights_only` and saved as safetensors in `scratch`."""
    try:
        loaded = torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (UnpicklingError, a corrupt zip, an unsafe global: all a refusal)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ColdFusionError(f"{pickle}: refused: not a plain state dict that loads with weights_only "
                              f"({first[:300]})") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ColdFusionError(f"{pickle}: expected a dict of tensors (a state dict)")
    converted = scratch / f"{len(list(scratch.iterdir()))}.safetensors"
    save_tensors(converted, loaded)
    return converted


def weight_files(model_dir: Path, allow_pickle: bool, scratch: Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded or not); a pickle only when allowed."""
    files = safetensors_files(model_dir)
    if files:
        return files
    pickle = model_dir / "pytorch_model.bin"
    if pickle.exists():
        if not allow_pickle:
            raise ColdFusionError(f"{model_dir} has only pytorch_model.bin, a pickle that can run code when loaded; "
                                  "convert it to safetensors, or set `allow_pickle: true` if you trust its source")
        return [pickle_to_safetensors(pickle, scratch)]
    raise ColdFusionError(f"{model_dir} has no model.safetensors (nor shards): is it a model directory?")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ColdFusionError(f"{model_dir} has no config.json: is it a model directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ColdFusionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ColdFusionError(f"{path}: a model config is a JSON object, not a {type(config).__name__}")
    return config


def is_plain_encoder(config: dict) -> bool:
    """Saved by AutoModel (BertModel, RobertaModel, ...) rather than a task model (...ForX)."""
    archs = config.get("architectures") or []
    return len(archs) == 1 and archs[0].endswith("Model") and "For" not in archs[0]


def body_layout(dirs: list[Path], files: dict[Path, list[Path]]) -> tuple[set[str], str]:
    """The body's tensor names and class name.

    Read from the first plain-encoder checkpoint among the models when there is one (no
    modeling code imported: that import is most of a merge's start-up time); otherwise
    from the architecture transformers builds for the config, on the meta device.
    """
    for d in dirs:
        config = read_config(d)
        if is_plain_encoder(config):
            with SafetensorsReader(files[d]) as reader:
                return reader.keys(), config["architectures"][0]
    from transformers import AutoConfig, AutoModel  # only here: the import costs seconds

    with torch.device("meta"):  # the layout only: no memory, no initialisation
        body = AutoModel.from_config(AutoConfig.from_pretrained(dirs[0]))
    return set(body.state_dict()), type(body).__name__


def open_body(files: list[Path], body_keys: set[str], label: str) -> SafetensorsReader:
    """Read a checkpoint as a body: with no prefix, or the one that uncovers the most body
    tensors (a classifier stores its body under "bert.", "roberta.", ...)."""
    with SafetensorsReader(files, label=label) as raw:
        prefixes = [""] + sorted({k.split(".", 1)[0] + "." for k in raw.keys() if "." in k})
    best = max(prefixes, key=lambda p: len({k[len(p):] for k in raw.keys() if k.startswith(p)} & body_keys))
    reader = SafetensorsReader(files, best, label)
    if not reader.keys() & body_keys:
        reader.close()
        raise ColdFusionError(f"{label} has none of the body tensors of this architecture")
    return reader
