"""The bodies being ranked: repository versions or model directories, named by their content.

A body's `sha256` is that of its tensors serialized the way the repository stores them,
so the same weights get the same cached features however the user named them.
"""

from dataclasses import dataclass
from pathlib import Path

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors, serialize, sha256_bytes
from coldfusion.models.encoder import Encoder
from coldfusion.repository import Repository


@dataclass(frozen=True)
class Body:
    name: str  # as the user wrote it
    source: str  # model source of its architecture and tokenizer
    sha256: str
    tensors: Tensors  # what the model computes (an adapter folded in)
    adapter: Tensors | None = None  # adapter intertraining: the LoRA factors, trained on top of...
    adapter_base: Tensors | None = None  # ...this body, where the target finetune continues them


class Encoders:
    """Each model source loaded once (tokenizer, architecture, pretrained tensors)."""

    def __init__(self):
        self._loaded: dict[str, Encoder] = {}

    def __call__(self, source: str) -> Encoder:
        if source not in self._loaded:
            self._loaded[source] = Encoder.load(source)
        return self._loaded[source]

    def add(self, encoder: Encoder) -> Encoder:
        """Keep an encoder loaded some other way (a repository's stored model), under its source."""
        return self._loaded.setdefault(encoder.source, encoder)


def body_of(name: str, source: str, tensors: Tensors) -> Body:
    return Body(name, source, sha256_bytes(serialize(tensors)), tensors)


def load_candidate(text: str, encoders: Encoders) -> Body:
    """`REPO` (its latest version), `REPO@VERSION` (v3, 3 or a checksum prefix), a model
    directory, 'default' (the bundled MiniLM) or a hub id."""
    path, at, ref = text.partition("@")
    if Repository.exists_at(Path(path)):
        repo = Repository(Path(path), create=False)
        version = repo.resolve(ref if at else "latest")
        encoder = encoders.add(Encoder.from_repository(repo, version))  # the model files stored with it
        return Body(text, encoder.source, version.sha256, encoder.pretrained)  # pretrained: the version's body
    if at and Path(path).is_dir():
        raise ColdFusionError(f"candidate '{text}': {path} is not a coldfusion repository (no index.sqlite), "
                              "so '@VERSION' means nothing there; name the model directory alone")
    encoder = encoders(text)
    return body_of(text, encoder.source, encoder.pretrained)
