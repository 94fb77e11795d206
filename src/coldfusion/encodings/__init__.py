"""How a contribution travels: the full body, a half-precision delta, a sparse delta, or LoRA factors.

`encode_contribution` turns a finetuned body into what the contributor sends (LoRA
payloads come from training instead, see lora.py); `decode_contribution` turns what was
sent back into a body on the base it was trained from. The repository stores what was
sent and decodes it when it fuses.
"""

from coldfusion.encodings.settings import EncodingSettings, LoraSettings

_LAZY = {name: "coldfusion.encodings.codec"
         for name in ("FULL", "decode_contribution", "encode_contribution", "payload_bytes")}


def __getattr__(name: str):
    """Import a submodule only when one of its names is used: configs and the CLI import
    this package's settings without paying for torch."""
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["EncodingSettings", "LoraSettings", *_LAZY]
