"""results.jsonl: the tidy table of a run, one JSON row per measurement."""

import json
from pathlib import Path

from coldfusion.io.checkpoint import atomic_write_bytes


class ResultsLog:
    """results.jsonl: one JSON row per measurement; rewritten atomically, appended per iteration."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, iteration: int) -> None:
        kept = [r for r in self.rows() if r["iteration"] <= iteration]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def extend(self, rows: list[dict]) -> None:
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows() + rows).encode())
