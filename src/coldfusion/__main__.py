"""`python -m coldfusion` = the `coldfusion` command."""

from coldfusion.cli import app

app(prog_name="coldfusion")
