"""`delta`: every float tensor of body - base, in a half-precision dtype (2x fewer bytes).

Integer buffers are not sent: they must equal the base's, and decoding takes the base's.
"""

import torch

from coldfusion.infra.errors import ColdFusionError
from coldfusion.io.checkpoint import Tensors

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode_delta(body: Tensors, base: Tensors, dtype: str) -> Tensors:
    return {k: (v.float() - base[k].float()).to(DTYPES[dtype]) for k, v in body.items() if v.is_floating_point()}


def decode_delta(payload: Tensors, base: Tensors) -> Tensors:
    expected = {k for k, v in base.items() if v.is_floating_point()}
    if set(payload) != expected:
        missing, extra = sorted(expected - set(payload)), sorted(set(payload) - expected)
        raise ColdFusionError(f"delta tensors do not match the base's float tensors: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    out = {}
    for name, value in base.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        delta = payload[name]
        if delta.shape != value.shape or not delta.is_floating_point():
            raise ColdFusionError(f"delta '{name}' is {delta.dtype} {list(delta.shape)}; the base's tensor is "
                                  f"{list(value.shape)} and a delta must be floating point")
        out[name] = (value.float() + delta.float()).to(value.dtype)
    return out
