"""A model directory's weight files, and their sha256 computed in the background.

Light (no torch import): `coldfusion merge` starts hashing its inputs before torch has
finished importing, so the checksums for the model card cost no wall time.
"""

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
# What a model directory holds besides its weights: enough to rebuild its architecture
# and tokenizer (a repository stores these beside the bodies).
MODEL_FILES = ("config.json", *TOKENIZER_FILES)

_hashes: dict[tuple, Future] = {}
_lock = threading.Lock()


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (its shards, or one file; [] if none)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model_dir / "model.safetensors"] if (model_dir / "model.safetensors").exists() else []


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)  # releases the GIL for a chunk this size
    return h.hexdigest()


def _key(path: Path) -> tuple:
    st = os.stat(path)  # a file rewritten since it was hashed gets a new key
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def start_hashing(paths: list[Path]) -> None:
    """Hash `paths` in a daemon thread (one file at a time: reads are sequential)."""
    todo = []
    with _lock:
        for path in paths:
            key = _key(path)
            if key not in _hashes:
                _hashes[key] = Future()
                todo.append((path, _hashes[key]))

    def work():
        for path, future in todo:
            try:
                future.set_result(sha256_file(path))
            except BaseException as exc:  # reported to whoever asks for this hash
                future.set_exception(exc)

    if todo:
        threading.Thread(target=work, daemon=True, name="sha256").start()


def sha256(path: Path) -> str:
    """The file's sha256, from the background hash when one was started."""
    start_hashing([path])
    return _hashes[_key(path)].result()
