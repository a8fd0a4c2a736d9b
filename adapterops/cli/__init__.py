"""The `adapterops` command line: click commands (commands.py), what they share (common.py), and every piece of
text they show (render.py)."""

from adapterops.cli.commands import cli, main

__all__ = ["cli", "main"]
