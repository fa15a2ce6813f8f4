"""python -m slimtune: the same CLI as the slimtune command."""

from slimtune.cli import app

app(prog_name="slimtune")
