"""Training settings as configs spell them (light: pydantic only, no torch).

The keys every config that trains or infers shares live here once: `ComputeSettings`
(device, precision, threads), `EncoderSettings` (+ max_length, pooling) and
`ExperimentSettings` (+ seed, model); each command's config extends one of them."""

import re
from typing import Literal

from pydantic import Field, field_validator

from coldfusion.infra.config_files import ConfigSection


class ComputeSettings(ConfigSection):
    """Where and how a command computes (resolved by runtime.resolve_compute)."""

    device: str = Field(
        "auto", description="auto (CUDA when present, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device multiplies it natively (CUDA since Ampere, CPUs with "
                            "AVX512-BF16 or AMX), else fp32; fp32 is the reference path")
    threads: int | Literal["auto"] = Field("auto", description="torch threads; auto: the cores this process may use")

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value):
        text = str(value).strip().lower()
        if re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", text):
            return text
        raise ValueError(f"give auto, cpu, cuda, cuda:N or mps, not {value!r}")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"give a number of threads (1 or more) or 'auto', not {value!r}")


class EncoderSettings(ComputeSettings):
    """How text becomes features, and where: what every config that trains or infers sets."""

    max_length: int = Field(64, ge=8, description="tokens per example; longer texts are truncated")
    pooling: Literal["mean", "cls"] = Field("mean", description="how token vectors become one text vector")


class ExperimentSettings(EncoderSettings):
    """What a training experiment adds: the model it starts from and the seed of every random choice."""

    seed: int = 0
    model: str = Field("default", description="'default' (bundled MiniLM), a model directory or a hub id")


class FinetuneSettings(ConfigSection):
    epochs: float = Field(1.0, gt=0, description="passes over the training examples (fractions allowed)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0, description="learning rate of the body")
    head_lr: float = Field(1e-3, gt=0, description="learning rate of the head (it starts from scratch)")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int | None = Field(None, ge=1, description="steps between validation checks; default once per epoch")
    patience: int = Field(3, ge=1, description="validation checks without improvement before stopping")


class ProbeSettings(ConfigSection):
    l2_grid: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1)
    max_iter: int = Field(200, ge=1, description="L-BFGS iterations per fit")
    batch_size: int = Field(64, ge=1, description="batch size of feature extraction")


class ProbeProtocol(ConfigSection):
    """How a base is scored on a task: a linear probe fit on the task's own train split,
    chosen on its validation split, scored on its test split (the first N of each)."""

    train_examples: int | None = Field(600, ge=1, description="examples the linear-probe head is fit on")
    validation_examples: int | None = Field(200, ge=1)
    test_examples: int | None = Field(600, ge=1)
    probe: ProbeSettings = ProbeSettings()
