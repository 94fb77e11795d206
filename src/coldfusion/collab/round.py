"""What one iteration's contributors return, whichever engine ran them."""

from dataclasses import dataclass, field

from coldfusion.contributors.contributor import ContributionResult


@dataclass
class RoundResult:
    results: list[ContributionResult]
    missing: dict[str, str] = field(default_factory=dict)  # chosen contributor -> why nothing arrived
    declined: dict[str, str] = field(default_factory=dict)  # chosen contributor -> why it chose not to train


@dataclass
class EvaluationRound:
    """Each contributor's scores of one base on its own task (numbers only), and why the
    others sent none."""

    scores: dict[str, dict]
    missing: dict[str, str] = field(default_factory=dict)
