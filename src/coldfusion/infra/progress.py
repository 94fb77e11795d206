"""Progress reporting for long jobs: a rich implementation and a silent one."""

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class SilentProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start_run(self, total_iterations: int, done: int) -> None: ...
    def phase(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def iteration_done(self) -> None: ...
    def log(self, message: str) -> None: ...


class RichProgress(SilentProgress):
    """Two bars: iterations of the loop, and the current phase (training / probing), with ETA."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("[bold]{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
        )
        self.loop = self.current = None

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def start_run(self, total_iterations: int, done: int) -> None:
        self.loop = self.bars.add_task("iterations", total=total_iterations, completed=done)

    def phase(self, description: str, total: int) -> None:
        if self.current is not None:
            self.bars.remove_task(self.current)
        self.current = self.bars.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.current is not None:
            self.bars.advance(self.current, n)

    def iteration_done(self) -> None:
        if self.loop is not None:
            self.bars.advance(self.loop, 1)

    def log(self, message: str) -> None:
        self.bars.console.print(message)
