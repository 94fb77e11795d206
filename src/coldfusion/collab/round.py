"""What one iteration's contributors return, whichever engine ran them."""

from dataclasses import dataclass, field

from coldfusion.collab.contributor import ContributionResult


@dataclass
class RoundResult:
    results: list[ContributionResult]
    missing: dict[str, str] = field(default_factory=dict)  # chosen contributor -> why it sent nothing
