"""The local engine: every contributor runs in this process, one after another."""

from collections.abc import Callable, Sequence

from coldfusion.checkpoint import Tensors
from coldfusion.collab.contributor import ContributionResult, Contributor


class LocalEngine:
    name = "local"

    def run_round(
        self, contributors: Sequence[Contributor], base: Tensors, iteration: int,
        on_start: Callable[[Contributor, int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[ContributionResult]:
        results = []
        for c in contributors:
            if on_start:
                on_start(c, len(c.examples_for(iteration)))
            results.append(c.contribute(base, iteration, on_step=on_step))
        return results
