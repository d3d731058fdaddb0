"""The terminal console every command prints to, and argument parsing that fails in one line.

A ground-floor module: commands at any layer (the farm, the study, the importers, the unlearning
report) print through the same console and parse their options the same way, without importing
the command-line entry points above them.
"""

from __future__ import annotations

import re

from jsonargparse import ArgumentParser, Namespace
from rich.console import Console

from mia_lightning.errors import MiaError

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 240)  # keep the results table (with its intervals) on one line per output in logs and pipes


UNION_ERROR = re.compile(r"Does not validate against any of the Union subtypes .*?- Problem with given class_path '(?P<class_path>[^']+)': "
                         r"(?P<reason>.*?)(?: - Expected a <class 'NoneType'>)?(?: Given value type: .*)?$")
"""jsonargparse's error for a ``class_path`` + ``init_args`` option: the one reason that matters is the class's."""

RECIPE_COMMANDS = {"study": "train.py study", **dict.fromkeys(("model", "data", "trainer", "plan", "farm"), "train.py farm")}
"""A recipe file's top-level sections and the command that runs a file with them."""


def parse(parser: ArgumentParser, argv: list[str]) -> Namespace:
    """Parse ``argv``; a bad option or config becomes one ``MiaError`` line instead of the usage dump."""
    import argparse

    parser.exit_on_error = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        detail = _short_reason(" ".join(str(err).split()))
        raise MiaError(f"{parser.prog}: {detail}{_other_command(parser.prog, detail, argv)} (see `{parser.prog} --help`)") from None


def _short_reason(detail: str) -> str:
    """``Parser key "model": <class>: Option 'weight_decy' is not accepted`` for jsonargparse's every-subtype report."""
    match = UNION_ERROR.search(detail)
    return detail if match is None else f"{detail[:match.start()]}{match['class_path']}: {match['reason']}"


def _other_command(prog: str, detail: str, argv: list[str]) -> str:
    """``; ... run it with `train.py study --config x.yaml``` when the refused option is a section of another command's recipe."""
    match = re.search(r"Option '(\w+)\.", detail)
    command = RECIPE_COMMANDS.get(match[1]) if match else None
    if command is None or command == prog:
        return ""
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "<recipe>"
    return f"; a {match[1]}: section makes the config a {command.split()[-1]} recipe: run it with `{command} --config {config}`"
