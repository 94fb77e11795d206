"""The ColD Fusion loop and the engines that run its contributors (coldfusion.contributors).

Exports load on first use, so that reading a run config (`collab.config`) never pays for torch.
"""

from coldfusion.infra.lazy import lazy_exports

_LAZY = {"LocalEngine": "coldfusion.collab.local_engine", "run_cold_fusion": "coldfusion.collab.loop"}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
