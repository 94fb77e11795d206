"""The Typer app and what every command shares: how errors, interruptions and results are printed."""

import os
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork nothing; keeps the log quiet

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.text import Text  # noqa: E402

from coldfusion.infra.errors import ColdFusionError  # noqa: E402

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  context_settings=HELP, help="ColD Fusion: collaborative descent for text encoders.")
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from coldfusion import __version__

        console.print(f"coldfusion {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """ColD Fusion: collaborative descent for text encoders."""


def fail(exc: ColdFusionError) -> None:
    # the message is plain text (paths, YAML excerpts with brackets): never markup
    Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False)
    raise typer.Exit(code=2)


@contextmanager
def interrupted(again: str):
    """Ctrl-C ends a long command with a word on how to go on, not silently (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        Console(stderr=True).print(Text.assemble(
            ("interrupted:", "bold yellow"), " what finished is kept (checkpoints are written atomically); "
            f"continue with: {again}"), highlight=False)
        raise typer.Exit(code=130) from None


def done(label: str, rest: str) -> None:
    """A green label, then plain text (paths and names are never read as markup)."""
    console.print(Text.assemble((label, "green"), " ", rest), highlight=False)


def warn(text: str) -> None:
    console.print(Text.assemble(("warning:", "bold yellow"), " ", text), highlight=False)


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def open_repository(path: Path):
    """The repository at `path`; a path that holds none is an error, not a new repository."""
    from coldfusion.repository import Repository

    try:
        return Repository(path, create=False)
    except ColdFusionError as exc:
        fail(exc)


