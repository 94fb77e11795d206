"""A contribution from outside a run: a party finetuned the base on its own and sends the result.

It arrives as a body file (safetensors) or as a model directory (saved by transformers;
a classifier's body is found under its "bert." / "roberta." ... prefix, as `coldfusion
merge` finds it). Pickles (`.bin`, `.pt`) can run code when loaded and are refused
unless the caller trusts the sender (`allow_pickle`); even then they are read with
`weights_only`. What was read goes through admission (intake.py), as every contribution
does: a faulty upload is refused there, naming the rule, and only the refusal is kept.
"""

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors
from coldfusion.io.hf_checkpoint import open_body, pickle_to_safetensors, weight_files
from coldfusion.io.tensorfile import SafetensorsReader

if TYPE_CHECKING:
    from coldfusion.repository.store import Contribution, Repository
    from coldfusion.repository.validation import ValidationSettings

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


def store_upload(repo: "Repository", path: Path, base: str, contributor: str, task: str, examples: int,
                 allow_pickle: bool = False, rules: "ValidationSettings | None" = None) -> "Contribution":
    """Read an upload as a body of the version `base` (a reference: refs.py) and admit it as a
    contribution trained from that version, waiting for `coldfusion fuse`."""
    version = repo.resolve(base)
    with SafetensorsReader([repo.path_of(version.sha256)]) as reader:  # the names only
        body = read_upload(path, reader.keys(), allow_pickle)
    return repo.add_contribution(body, base_version=version.id, contributor=contributor, task=task,
                                 num_examples=examples, rules=rules)

