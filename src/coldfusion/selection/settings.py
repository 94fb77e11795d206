"""How candidates are scored: frozen-feature sizes, the probe, and the finetunes that confirm."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from coldfusion.encodings.settings import LoraSettings
from coldfusion.infra.config_files import load_config_file
from coldfusion.training import FinetuneSettings, ProbeSettings
from coldfusion.training.settings import EncoderSettings


class SelectionSettings(EncoderSettings):
    # Cheap scores: frozen features of the target's examples (and, for SEmb, the sources').
    feature_examples: int = Field(1000, ge=2, description="target training examples whose frozen features "
                                  "score a body (LogME, linear probe) and that SEmb averages")
    validation_examples: int = Field(500, ge=1, description="target validation examples that score the probe")
    probe: ProbeSettings = ProbeSettings()
    # Finetuning on the target: the confirmation of `rank --top-k` and the harness's truth.
    target_examples: int = Field(200, ge=1, description="target training examples of each finetune; small, "
                                 "as when a user has little labelled data (where a good start matters most)")
    test_examples: int | None = Field(500, ge=1, description="test examples a finetuned model is scored on")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    finetune: FinetuneSettings = FinetuneSettings(epochs=3, batch_size=16)
    # Intertraining (`select`): the base finetuned on each source task.
    source_examples: int = Field(1000, ge=1, description="source training examples of each intertraining")
    source_finetune: FinetuneSettings = FinetuneSettings(epochs=1, batch_size=16)
    # Adapter settings (Poth et al. 2021): a LoRA adapter is intertrained on the source, and the
    # same adapter continues on the target; the body itself never changes. The scores see the
    # intertrained model (the adapter folded into the body).
    intertraining: Literal["full", "lora"] = Field(
        "full", description="`full`: intertrain and finetune the whole body; `lora`: a LoRA adapter (peft)")
    lora: LoraSettings = LoraSettings()


def compute_of(s: SelectionSettings):
    """`s`'s device and precision resolved here (the commands check them once, up front)."""
    from coldfusion.infra.runtime import resolve_compute

    return resolve_compute(s.device, s.precision, s.threads)


def load_selection_settings(path: Path | None) -> SelectionSettings:
    if path is None:
        return SelectionSettings()
    return load_config_file(path, SelectionSettings)
