"""Where a contributor's task head survives between rounds, restarts and resumed runs."""

from pathlib import Path

from coldfusion.io.checkpoint import Tensors, load_tensors, save_tensors


class HeadStore:
    """A contributor's task head after each round it trained in, so a restarted node or a
    resumed run continues with the head the uninterrupted run would have had.

    A round trains from the newest head saved *before* it: a round that is redone after a
    crash does not see the head it saved the first time. Only the two newest are kept.
    """

    KEEP = 2

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, iteration: int) -> Path:
        return self.root / f"iter{iteration:04d}.safetensors"

    def _saved(self) -> list[int]:
        found = []
        for path in self.root.glob("iter*.safetensors"):
            digits = path.name.removeprefix("iter").removesuffix(".safetensors")
            if digits.isdigit():
                found.append(int(digits))
        return sorted(found)

    def before(self, iteration: int) -> Tensors | None:
        earlier = [i for i in self._saved() if i < iteration]
        return load_tensors(self._path(earlier[-1])) if earlier else None

    def next_round(self) -> int:
        """The round after the newest one a head was saved for (0 if none): where a contributor
        that was stopped takes up its count again."""
        saved = self._saved()
        return saved[-1] + 1 if saved else 0

    def save(self, iteration: int, head: Tensors) -> None:
        save_tensors(self._path(iteration), head)  # atomic
        for old in self._saved()[:-self.KEEP]:
            self._path(old).unlink(missing_ok=True)
