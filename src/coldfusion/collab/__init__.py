"""The ColD Fusion loop and the engines that run its contributors."""

from coldfusion.collab.contributor import ContributionResult, Contributor
from coldfusion.collab.local_engine import LocalEngine
from coldfusion.collab.loop import run_cold_fusion

__all__ = ["ContributionResult", "Contributor", "LocalEngine", "run_cold_fusion"]
