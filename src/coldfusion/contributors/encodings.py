"""How a contributor's update travels, one object per kind behind one interface.

A contributor builds its model, lets its encoding `attach` what training needs (LoRA
adapters), finetunes with the encoding's `finetune_settings` between `before_training`
(a FISH mask chooses the entries to train) and `after_training`, then sends `payload`:
the body, a delta, a sparse delta or LoRA factors. The repository, below this package, turns
a payload back into a body with `coldfusion.encodings.decode_contribution` (from `record()`).
"""

from coldfusion.encodings import EncodingSettings, encode_contribution
from coldfusion.io.checkpoint import Tensors
from coldfusion.models.encoder import Classifier, body_tensors
from coldfusion.training import Encoded, FinetuneSettings


class Encoding:
    """The full body, a delta or a sparse delta by magnitude: nothing to do before or during
    training; the payload is encoded from the finetuned body."""

    def __init__(self, settings: EncodingSettings):
        self.settings = settings

    def record(self) -> dict:
        """What the lineage keeps of it (and what decoding needs)."""
        return self.settings.record()

    def attach(self, model: Classifier) -> None:
        """Called while the model is built (under the contributor's seeded generator)."""

    def finetune_settings(self, settings: FinetuneSettings) -> FinetuneSettings:
        return settings

    def before_training(self, model: Classifier, data: Encoded, seed: int, examples: int) -> None:
        """Called on the placed model, with this round's data, just before finetuning."""

    def after_training(self) -> None:
        """Called once finetuning ends, even when it failed."""

    def payload(self, model: Classifier, base: Tensors) -> Tensors:
        """What is sent for the finetuned `model` trained from `base` (the model's body may be
        rewritten here: LoRA folds its adapters in, so that what follows sees the body)."""
        return encode_contribution(body_tensors(model.body), base, self.settings)


class Fish(Encoding):
    """A FISH mask (Sung et al. 2021): the entries of largest diagonal Fisher on the base, on
    this round's data, are the only ones trained, and exactly those are sent."""

    def __init__(self, settings: EncodingSettings):
        super().__init__(settings)
        self.indices, self.restriction = None, None

    def before_training(self, model: Classifier, data: Encoded, seed: int, examples: int) -> None:
        from coldfusion.encodings.sparse import restrict_training, top_share
        from coldfusion.training.statistics import diagonal_fisher

        self.indices = top_share(diagonal_fisher(model, data, examples, seed=seed), self.settings.density)
        self.restriction = restrict_training(model.body, self.indices)

    def after_training(self) -> None:
        if self.restriction is not None:
            self.restriction.remove()
            self.restriction = None

    def payload(self, model: Classifier, base: Tensors) -> Tensors:
        from coldfusion.encodings.sparse import sparse_payload

        return sparse_payload(body_tensors(model.body), base, self.indices, self.settings.dtype)


class Lora(Encoding):
    """LoRA adapters on the body's linear layers are trained (at their own learning rate) and
    their factors sent; the body is then the base with the adapters folded in."""

    def attach(self, model: Classifier) -> None:
        from coldfusion.encodings.lora import attach_lora

        model.body = attach_lora(model.body, self.settings.lora)

    def finetune_settings(self, settings: FinetuneSettings) -> FinetuneSettings:
        return settings.model_copy(update={"lr": self.settings.lora.lr})

    def payload(self, model: Classifier, base: Tensors) -> Tensors:
        from coldfusion.encodings.lora import lora_factors

        factors = lora_factors(model.body, self.settings.dtype)
        model.body = model.body.merge_and_unload()
        return factors


def encoding_for(settings: EncodingSettings) -> Encoding:
    """The encoding object of these settings (a fresh one: FISH keeps one round's mask)."""
    if settings.kind == "lora":
        return Lora(settings)
    if settings.kind == "sparse" and settings.score == "fisher":
        return Fish(settings)
    return Encoding(settings)
