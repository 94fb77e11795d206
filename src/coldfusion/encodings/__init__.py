"""How a contribution travels: the full body, a half-precision delta, a sparse delta, or LoRA factors.

`encode_contribution` turns a finetuned body into what the contributor sends (LoRA
payloads come from training instead, see lora.py); `decode_contribution` turns what was
sent back into a body on the base it was trained from. The repository stores what was
sent and decodes it when it fuses.
"""

from coldfusion.encodings.settings import EncodingSettings, LoraSettings
from coldfusion.infra.lazy import lazy_exports

_LAZY = {name: "coldfusion.encodings.codec"
         for name in ("FULL", "decode_contribution", "encode_contribution", "payload_bytes")}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["EncodingSettings", "LoraSettings", *_LAZY]
