"""How contributors encode what they send (`contribution:` in a run config)."""

from typing import Literal

from pydantic import Field

from coldfusion.infra.config_files import ConfigSection


class LoraSettings(ConfigSection):
    # r 16 at lr 1e-3 came within 0.3 points of full contributions, r 8 at 5e-4 within 0.75
    # (benchmarks/results/communication.jsonl)
    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, description="the adapter's update is scaled by alpha / r")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"], min_length=1,
        description="names of the body's linear layers that get adapters (peft's target_modules)")
    lr: float = Field(1e-3, gt=0, description="learning rate of the adapters (they start from zero)")


class EncodingSettings(ConfigSection):
    """What a contributor sends: `full` (its fp32 body), `delta` (body minus base in fp16 or
    bf16), `sparse` (the top `density` share of delta entries by magnitude or Fisher score,
    as indices + values) or `lora` (it trains LoRA adapters and sends their factors)."""

    kind: Literal["full", "delta", "sparse", "lora"] = "full"
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the delta values sent by `delta` and `sparse` (and of `lora` factors)")
    density: float = Field(0.02, gt=0, le=1, description="sparse: share of all delta entries sent")
    score: Literal["magnitude", "fisher"] = Field(
        "magnitude", description="sparse: send the largest |delta| entries after finetuning; or a FISH mask: "
                                 "choose the entries of largest diagonal Fisher on the base (on the contributor's "
                                 "own data) before finetuning, and train only those")
    lora: LoraSettings = LoraSettings()

    def record(self) -> dict:
        """What the lineage keeps: the settings that decoding needs and that shaped the update."""
        if self.kind == "full":
            return {"kind": "full"}
        if self.kind == "delta":
            return {"kind": "delta", "dtype": self.dtype}
        if self.kind == "sparse":
            return {"kind": "sparse", "dtype": self.dtype, "density": self.density, "score": self.score}
        return {"kind": "lora", "dtype": self.dtype, "r": self.lora.r, "alpha": self.lora.alpha,
                "target_modules": self.lora.target_modules}
