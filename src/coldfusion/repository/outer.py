"""The outer optimizer: a momentum step on the fused update instead of taking it as it is.

DiLoCo (Douillard et al., 2023) showed that in the loop of local training, averaging and
repeating, treating `base - fused` as a pseudo-gradient and stepping with Nesterov
momentum beats plain averaging. With the pseudo-gradient g_t = base_t - fused_t:

    buffer_t = momentum * buffer_{t-1} + g_t                   (buffer_0 = 0)
    step_t   = g_t + momentum * buffer_t   if nesterov, else buffer_t
    base_t+1 = base_t - lr * step_t

as `torch.optim.SGD(lr, momentum, nesterov)` steps (no dampening). lr 1 and momentum 0 is
plain ColD Fusion: base_t+1 = fused_t. The buffer is the optimizer's whole state; the
repository keeps it beside the version it produced, so a resumed run continues it.
"""

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from coldfusion.infra.config_files import ConfigSection

if TYPE_CHECKING:  # a run config reads OuterSettings without importing torch
    from coldfusion.io.checkpoint import Tensors


class OuterSettings(ConfigSection):
    lr: float = Field(1.0, gt=0, description="outer learning rate (DiLoCo: 0.7); 1 with momentum 0 is plain fusion")
    momentum: float = Field(0.0, ge=0, lt=1, description="outer momentum (DiLoCo: 0.9)")
    nesterov: bool = Field(False, description="Nesterov momentum (DiLoCo: true)")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs a momentum above 0")
        return self

    @property
    def is_plain(self) -> bool:
        return self.lr == 1 and self.momentum == 0


def outer_step(base: "Tensors", fused: "Tensors", buffer: "Tensors | None",
               settings: OuterSettings) -> "tuple[Tensors, Tensors | None]":
    """The next base and momentum buffer (None when momentum is 0). Floating tensors are
    stepped in fp32 and stored in the base's dtype; the buffer stays fp32. Other tensors
    (integer position ids) are the fused ones. Plain settings return `fused` itself: the
    arithmetic `base - (base - fused)` would round differently."""
    if settings.is_plain:
        return fused, None
    new, new_buffer = {}, {}
    for name, fused_t in fused.items():
        if not fused_t.is_floating_point():
            new[name] = fused_t
            continue
        b = base[name].float()
        g = b - fused_t.float()
        if settings.momentum:
            previous = buffer.get(name) if buffer is not None else None
            buf = g if previous is None else settings.momentum * previous.float() + g
            new_buffer[name] = buf
            step = g + settings.momentum * buf if settings.nesterov else buf
        else:
            step = g
        new[name] = (b - settings.lr * step).to(base[name].dtype)
    return new, (new_buffer if settings.momentum else None)

