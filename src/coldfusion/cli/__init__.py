"""The `coldfusion` command: parse, call the library, print. No logic of its own.

One module per command group; importing them registers their commands on `app`.
"""

from coldfusion.cli import experiments, flower, repository, selection, service  # noqa: F401  (registers)
from coldfusion.cli.app import app


def main() -> None:  # pragma: no cover
    import sys

    sys.exit(app())
