"""A contribution from outside a run: a party finetuned the base on its own and sends the result.

It arrives as a body file (safetensors) or as a model directory (saved by transformers;
a classifier's body is found under its "bert." / "roberta." ... prefix, as `coldfusion
merge` finds it). Pickles (`.bin`, `.pt`) can run code when loaded and are refused
unless the caller trusts the sender (`allow_pickle`); even then they are read with
`weights_only`. The repository validates the body when it fuses, not here: a faulty
upload is stored, refused with its reason, and stays on record.
"""

import tempfile
from pathlib import Path

from coldfusion.checkpoint import Tensors
from coldfusion.errors import ColdFusionError
from coldfusion.merge import open_body, pickle_to_safetensors, weight_files

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_upload(path: Path, body_keys: set[str], allow_pickle: bool = False) -> Tensors:
    """The body tensors of a contribution file or model directory."""
    path = Path(path)
    if not path.exists():
        raise ColdFusionError(f"{path}: no such file or directory")
    if not path.is_dir() and path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ColdFusionError(f"{path}: expected a .safetensors file or a model directory")
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ColdFusionError(f"{path} is a pickle, which can run code when loaded; send safetensors "
                              "(safetensors.torch.save_file), or pass --allow-pickle if you trust its source")
    with tempfile.TemporaryDirectory() as scratch:
        if path.is_dir():
            files = weight_files(path, allow_pickle, Path(scratch))
        else:
            files = [pickle_to_safetensors(path, Path(scratch)) if path.suffix in PICKLE_SUFFIXES else path]
        # a classifier's body is read from under its prefix, whatever form it came in
        with open_body(files, body_keys, str(path)) as reader:
            return {k: reader.get_tensor(k) for k in sorted(reader.keys())}
