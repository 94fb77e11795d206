"""Encoding a finetuned body for sending, and decoding what was sent (see the package docstring)."""


from coldfusion.encodings.delta import decode_delta, encode_delta
from coldfusion.encodings.settings import EncodingSettings
from coldfusion.encodings.sparse import decode_sparse, encode_sparse
from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors

FULL = {"kind": "full"}


def encode_contribution(body: Tensors, base: Tensors, s: EncodingSettings, fisher: Tensors | None = None) -> Tensors:
    if s.kind == "full":
        return body
    if s.kind == "delta":
        return encode_delta(body, base, s.dtype)
    if s.kind == "sparse":  # (a contributor with a FISH mask sends its trained entries instead: sparse.py)
        if s.score == "fisher" and fisher is None:
            raise ColdFusionError("a sparse contribution by Fisher score needs the contributor's Fisher")
        return encode_sparse(body, base, s.density, s.dtype, fisher if s.score == "fisher" else None)
    raise ColdFusionError("a LoRA contribution is made by training adapters, not by encoding a body")


def decode_contribution(payload: Tensors, encoding: dict, base: Tensors) -> Tensors:
    """The body a payload stands for, on `base` (the version it was trained from)."""
    kind = encoding.get("kind", "full")
    if kind == "full":
        return payload
    if kind == "delta":
        return decode_delta(payload, base)
    if kind == "sparse":
        return decode_sparse(payload, base)
    if kind == "lora":
        from coldfusion.encodings.lora import fold_lora  # imports peft

        return fold_lora(payload, base, float(encoding["alpha"]), int(encoding["r"]))
    raise ColdFusionError(f"unknown contribution encoding '{kind}'")


def payload_bytes(tensors: Tensors) -> int:
    """Bytes of the tensors' data (what the safetensors file holds, less its small header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
