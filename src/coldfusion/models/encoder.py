"""Encoders: a pretrained body (any HF AutoModel) plus a task head we own.

Only the body is ever fused; heads stay with their task.
"""

import copy
import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors
from coldfusion.models.names import portable_name, resolve_model_source

transformers_logging.disable_progress_bar()  # "Loading weights" bars would drown our own progress

def _from_pretrained(loader, source: str):
    try:
        return loader.from_pretrained(source)
    except OSError as exc:
        raise ColdFusionError(
            f"could not load model '{source}': {exc}\nIt is neither a local model directory nor a "
            "reachable Hugging Face hub id. Without network access, use `model: default` (the bundled "
            "MiniLM) or the path of a directory saved with save_pretrained."
        ) from exc


def load_body(source: str) -> PreTrainedModel:
    return _from_pretrained(AutoModel, resolve_model_source(source))


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    return _from_pretrained(AutoTokenizer, resolve_model_source(source))


def body_tensors(body: nn.Module) -> Tensors:
    """The body's state as detached CPU tensors (a copy, safe to keep while training goes on)."""
    return {k: v.detach().cpu().clone() for k, v in body.state_dict().items()}


def load_body_tensors(body: nn.Module, tensors: Tensors) -> None:
    """Put fused tensors into a body; the key set must match exactly."""
    missing, unexpected = body.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ColdFusionError(
            f"checkpoint does not fit this body: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class Classifier(nn.Module):
    """Body -> pooled sentence embedding -> dropout -> linear head.

    Its weights stay fp32; `compute_dtype` is the precision it trains and infers in
    (training/precision.py casts it for the duration), as its device is where it runs.
    """

    compute_dtype: torch.dtype = torch.float32

    def __init__(self, body: PreTrainedModel, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ColdFusionError(f"pooling must be 'mean' or 'cls', not '{pooling}'")
        self.body = body
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(body.config.hidden_size, num_labels)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))

    def place(self, device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32) -> "Classifier":
        """Move to `device`, to compute in `compute_dtype` there."""
        self.compute_dtype = compute_dtype
        return self.to(device)


def _hub_snapshot(hub_id: str) -> Path | None:
    """The local copy of a hub model's files, if the hub cache has one (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, not a hub id: nothing to store)
        return None


@dataclass
class Encoder:
    """A loaded model: its tokenizer, architecture config and pretrained tensors; a fresh
    copy of its body on demand.

    `source` identifies the model (a directory, a hub id, or for a model stored in a
    repository the digest of its files); `name` is its portable name; `files_dir` a local
    directory of its config and tokenizer files, when there is one.
    """

    source: str
    tokenizer: PreTrainedTokenizerBase
    pretrained: Tensors
    config: PretrainedConfig
    name: str = ""
    files_dir: Path | None = None

    @classmethod
    def load(cls, source: str) -> "Encoder":
        resolved = resolve_model_source(source)
        body = load_body(resolved)
        files = Path(resolved) if Path(resolved).is_dir() else _hub_snapshot(resolved)
        return cls(source=resolved, tokenizer=load_tokenizer(resolved), pretrained=body_tensors(body),
                   config=body.config, name=portable_name(source), files_dir=files)

    @classmethod
    def from_repository(cls, repo, version) -> "Encoder":
        """The architecture and tokenizer a repository version was made with, from the files
        the repository stores (they follow it wherever it moves), its body as `pretrained`."""
        model = repo.model_of(version)
        if model is None:  # a repository made before model files were stored
            try:
                if Path(version.model_source).is_absolute() and not Path(version.model_source).is_dir():
                    raise ColdFusionError("that directory is gone")  # a path, not a hub id: do not ask the hub
                encoder = cls.load(version.model_source)
            except ColdFusionError as exc:
                raise ColdFusionError(
                    f"version {version.id} of {repo.root} names its model only as '{version.model_source}', which "
                    f"cannot be loaded here ({str(exc).splitlines()[0]}); store the model's files in the repository "
                    f"with `coldfusion adopt-model {repo.root} MODEL_DIR`") from None
            return dataclasses.replace(encoder, pretrained=repo.load(version.sha256))
        with tempfile.TemporaryDirectory(prefix="coldfusion-model-") as tmp:
            files = repo.write_model_files(model, Path(tmp))
            config = _from_pretrained(AutoConfig, str(files))
            tokenizer = _from_pretrained(AutoTokenizer, str(files))
        digest = hashlib.sha256(json.dumps(model.files, sort_keys=True).encode()).hexdigest()[:16]
        return cls(f"stored-model:{digest}", tokenizer, repo.load(version.sha256), config, model.name, None)

    def new_body(self, tensors: Tensors | None = None) -> PreTrainedModel:
        """A body with the given tensors (default: the pretrained ones)."""
        body = AutoModel.from_config(copy.deepcopy(self.config))
        load_body_tensors(body, self.pretrained if tensors is None else tensors)
        return body

    def save_pretrained(self, tensors: Tensors, out_dir: Path) -> Path:
        """Write a directory that `AutoModel.from_pretrained` (and AutoTokenizer) load."""
        out_dir = Path(out_dir)
        self.new_body(tensors).save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        return out_dir
