"""CA-MTL (Pilault et al., ICLR 2021): task conditioning around a pretrained BERT-family
encoder (docs/METHODS.md section 5).

A learned task embedding z feeds small hypernetworks (linear maps, zero at start) that
make FiLM scale and shift, applied as `(1 + gamma(z)) x + beta(z)`:

- conditional alignment: FiLM on the embeddings' output;
- the embeddings and the bottom half of the layers are frozen;
- each upper layer: conditional attention (a task-conditioned block-diagonal term added to
  the attention scores) and conditional layer norm (FiLM on every LayerNorm's output);
- the top layer: a conditional bottleneck adapter (hidden -> hidden / 3 -> hidden, FiLM
  inside, residual).

The pretrained modules are used as they are: the conditioning wraps them through forward
hooks and a registered attention function (transformers' AttentionInterface), so the
body's own weights keep their names and the trained body is stored like any other base.
At start every conditioning term is zero, so the wrapped encoder computes exactly what the
pretrained one does.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from coldfusion.infra.errors import ColdFusionError

ATTENTION = "coldfusion_ca_mtl"


def _zero_linear(inputs: int, outputs: int) -> nn.Linear:
    layer = nn.Linear(inputs, outputs)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FiLM(nn.Module):
    """`(1 + gamma(z)) * x + beta(z)` over the last dimension of x, one (gamma, beta) per
    example, made from its task embedding z by a linear hypernetwork that starts at zero."""

    def __init__(self, task_dim: int, features: int):
        super().__init__()
        self.features = features
        self.hypernetwork = _zero_linear(task_dim, 2 * features)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.hypernetwork(z).to(x.dtype).chunk(2, dim=-1)
        shape = (z.shape[0],) + (1,) * (x.dim() - 2) + (self.features,)
        return (1 + gamma.view(shape)) * x + beta.view(shape)


class BlockDiagonalAttention(nn.Module):
    """CA-MTL's conditional attention term M(z), added to the attention scores before the
    softmax: a block-diagonal L x L matrix of `blocks` blocks A'_n = (1 + gamma_n(z)) A_n +
    beta_n(z), each of size ceil(max_length / blocks); positions in different blocks get 0."""

    def __init__(self, task_dim: int, max_length: int, blocks: int):
        super().__init__()
        self.size = math.ceil(max_length / blocks)
        self.blocks = nn.Parameter(torch.zeros(blocks, self.size, self.size))
        self.hypernetwork = _zero_linear(task_dim, 2 * blocks)

    def forward(self, z: torch.Tensor, length: int) -> torch.Tensor:
        """(batch, 1, length, length): one matrix per example, shared by the heads."""
        n, b = self.blocks.shape[0], self.size
        gamma, beta = self.hypernetwork(z).chunk(2, dim=-1)  # (batch, blocks) each
        conditioned = (1 + gamma)[:, :, None, None] * self.blocks + beta[:, :, None, None]
        eye = torch.eye(n, dtype=conditioned.dtype, device=conditioned.device)
        full = (conditioned[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(z.shape[0], n * b, n * b)
        if length > n * b:  # positions past max_length get no term
            full = nn.functional.pad(full, (0, length - n * b, 0, length - n * b))
        return full[:, None, :length, :length]


class ConditionalAdapter(nn.Module):
    """x + up(FiLM(gelu(down(x)))): a bottleneck of hidden / ratio; `up` starts at zero."""

    def __init__(self, task_dim: int, hidden: int, ratio: int = 3):
        super().__init__()
        inner = max(1, hidden // ratio)
        self.down = nn.Linear(hidden, inner)
        self.film = FiLM(task_dim, inner)
        self.up = _zero_linear(inner, hidden)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.film(nn.functional.gelu(self.down(x)), z))


def transformer_layers(body: PreTrainedModel) -> nn.ModuleList:
    """The stack of transformer layers of a BERT-family encoder (BERT, RoBERTa, MiniLM: encoder.layer;
    DistilBERT: transformer.layer)."""
    for path in ("encoder.layer", "transformer.layer"):
        module = body
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ColdFusionError(f"CA-MTL needs a BERT-family encoder (BERT, RoBERTa, DistilBERT, MiniLM); "
                          f"{type(body).__name__} has neither encoder.layer nor transformer.layer")


def _self_attentions(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if type(m).__name__.endswith("SelfAttention")]


def _conditional_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention with the layer's task-conditioned term added to the scores (where the
    module carries one and a task is set; the frozen layers attend as before)."""
    owner = module.__dict__.get("_ca_mtl")  # a plain attribute: not a submodule of the body
    bias = owner.attention_term(module, query.shape[2]) if owner is not None else None
    if bias is not None:
        bias = bias.to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=bias, **kwargs)


AttentionInterface.register(ATTENTION, _conditional_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class CaMtlEncoder(nn.Module):
    """A pretrained encoder wrapped with CA-MTL's task conditioning. `for_task(i)` is a view
    that behaves like the body (same call, same outputs) for task i, so a `Classifier` per
    task shares the body and the conditioning."""

    def __init__(self, body: PreTrainedModel, num_tasks: int, max_length: int, task_dim: int = 64,
                 attention_blocks: int = 4, adapter_ratio: int = 3):
        super().__init__()
        if num_tasks < 1:
            raise ColdFusionError("CA-MTL needs at least one task")
        self.body = body
        layers = transformer_layers(body)
        hidden = body.config.hidden_size
        self.frozen_layers = len(layers) // 2
        for module in (body.embeddings, *layers[: self.frozen_layers]):
            module.requires_grad_(False)
        upper = list(layers[self.frozen_layers:])
        self.task_embedding = nn.Embedding(num_tasks, task_dim)
        nn.init.normal_(self.task_embedding.weight, std=0.02)
        self.alignment = FiLM(task_dim, hidden)
        self.attention = nn.ModuleList(BlockDiagonalAttention(task_dim, max_length, attention_blocks) for _ in upper)
        norms = [m for layer in upper for m in layer.modules() if isinstance(m, nn.LayerNorm)]
        self.layer_norms = nn.ModuleList(FiLM(task_dim, hidden) for _ in norms)
        self.adapter = ConditionalAdapter(task_dim, hidden, adapter_ratio)
        self._z: torch.Tensor | None = None
        self._attention_index = {}
        for i, layer in enumerate(upper):
            for attention in _self_attentions(layer):
                attention.__dict__["_ca_mtl"] = self
                self._attention_index[id(attention)] = i
        body.embeddings.register_forward_hook(lambda m, args, out: self._film(self.alignment, out))
        for norm, film in zip(norms, self.layer_norms, strict=True):
            norm.register_forward_hook(lambda m, args, out, film=film: self._film(film, out))
        layers[-1].register_forward_hook(self._adapt)
        body.set_attn_implementation(ATTENTION)

    @property
    def config(self):
        return self.body.config

    def conditioning(self) -> list[nn.Module]:
        """The modules CA-MTL adds (trained from scratch, beside the body)."""
        return [self.task_embedding, self.alignment, self.attention, self.layer_norms, self.adapter]

    def conditioning_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("body.")}

    def _film(self, film: FiLM, out: torch.Tensor) -> torch.Tensor:
        return out if self._z is None else film(out, self._z)

    def _adapt(self, module, args, out):
        if self._z is None:
            return out
        if isinstance(out, tuple):
            return (self.adapter(out[0], self._z), *out[1:])
        return self.adapter(out, self._z)

    def attention_term(self, attention: nn.Module, length: int) -> torch.Tensor | None:
        if self._z is None:
            return None
        return self.attention[self._attention_index[id(attention)]](self._z, length)

    def forward(self, task_ids: torch.Tensor, **inputs):
        self._z = self.task_embedding(task_ids.to(self.task_embedding.weight.device))
        try:
            return self.body(**inputs)
        finally:
            self._z = None

    def for_task(self, task: int) -> "TaskView":
        return TaskView(self, task)


class TaskView(nn.Module):
    """The encoder conditioned on one task, called like the body it wraps."""

    def __init__(self, encoder: CaMtlEncoder, task: int):
        super().__init__()
        self.encoder, self.task = encoder, task

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, **inputs):
        task_ids = torch.full((input_ids.shape[0],), self.task, dtype=torch.long)
        return self.encoder(task_ids, input_ids=input_ids, **inputs)


def parameter_count(modules: Sequence[nn.Module], trainable_only: bool = True) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
    return total
