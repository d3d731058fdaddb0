"""The terminal console every command prints to, and argument parsing that fails in one line.

A ground-floor module: commands at any layer (the farm, the study, the importers, the unlearning
report) print through the same console and parse their options the same way, without importing
the command-line entry points above them.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace
from rich.console import Console

from mia_lightning.errors import MiaError

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 240)  # keep the results table (with its intervals) on one line per output in logs and pipes


def parse(parser: ArgumentParser, argv: list[str]) -> Namespace:
    """Parse ``argv``; a bad option or config becomes one ``MiaError`` line instead of the usage dump."""
    import argparse

    parser.exit_on_error = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        detail = " ".join(str(err).split())
        raise MiaError(f"{parser.prog}: {detail} (see `{parser.prog} --help`)") from None
