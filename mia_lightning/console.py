"""The terminal console every command prints to, and argument parsing that fails in one line.

A ground-floor module: commands at any layer (the farm, the study, the importers, the unlearning
report) print through the same console and parse their options the same way, without importing
the command-line entry points above them.
"""

from __future__ import annotations

import re
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace
from rich.console import Console

from mia_lightning.errors import MiaError
from mia_lightning.recipe_files import config_value, recipe_reference

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 240)  # keep the results table (with its intervals) on one line per output in logs and pipes


UNION_ERROR = re.compile(r"Does not validate against any of the Union subtypes .*?- Problem with given class_path '(?P<class_path>[^']+)': "
                         r"(?P<reason>.*?)(?: - Expected a <class 'NoneType'>)?(?: Given value type: .*)?$")
"""jsonargparse's error for a ``class_path`` + ``init_args`` option: the one reason that matters is the class's."""
TYPE_UNION_ERROR = re.compile(r"Does not validate against any of the Union subtypes Subtypes: \[(?P<types>(?:(?!\] Errors: ).)*)\] Errors: (?:- Expected a <class '[^']*'> )+"
                              r"Given value type: <class '[^']*'> Given value: (?P<value>.*?)(?= - |$)")
"""jsonargparse's error for a value of none of a union of plain types (``list[int] | None``): said as "expected ..., given ..."."""

RECIPE_COMMANDS = {"study": "train.py study", **dict.fromkeys(("experiment", "model", "data", "trainer", "plan", "farm"), "train.py farm")}
"""A recipe file's top-level sections and the command that runs a file with them."""

FARM_ONLY_SECTIONS = ("experiment", "plan", "farm", "audit")
"""Sections a farm recipe may have and a LightningCLI ``fit`` config (model, data, trainer only) never has."""

FARM_FOLDER = "the folder <experiment.root>/<experiment.name> a farm writes"
"""What attack.py's ``--experiment DIR`` takes, where a farm recipe names it in two parts."""


def parse(parser: ArgumentParser, argv: list[str]) -> Namespace:
    """Parse ``argv``; a bad option or config becomes one ``MiaError`` line instead of the usage dump.

    Abbreviated options are refused (``--plan.n_model 4`` is a typo, not ``--plan.n_models 4``).
    """
    import argparse

    parser.exit_on_error = False
    parser.allow_abbrev = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise refused_arguments(parser.prog, err, argv) from None


def refused_arguments(prog: str, err: Exception, argv: list[str]) -> MiaError:
    """The one-line error for an ``ArgumentError`` raised while ``prog`` parsed ``argv`` (also the LightningCLI's, in ``train.py fit``)."""
    detail = _short_reason(" ".join(str(err).split()))
    message = _other_command(prog, detail, argv) or f"{prog}: {detail}"
    return MiaError(f"{message} (see `{prog} --help`)")


def _short_reason(detail: str) -> str:
    """``Parser key "model": <class>: Option 'weight_decy' is not accepted`` for jsonargparse's every-subtype report."""
    detail = TYPE_UNION_ERROR.sub(_expected_types, detail)
    match = UNION_ERROR.search(detail)
    return detail if match is None else f"{detail[:match.start()]}{match['class_path']}: {match['reason']}"


def _expected_types(match: re.Match[str]) -> str:
    """``expected list[int] or None, given foo`` for one ``TYPE_UNION_ERROR``."""
    types = [re.sub(r"<class '(?:builtins\.)?([^']*)'>", r"\1", kind).replace("NoneType", "None") for kind in re.split(r",\s*(?![^\[]*\])", match["types"])]
    return f"expected {' or '.join(types)}, given {match['value']}"


def _other_command(prog: str, detail: str, argv: list[str]) -> str | None:
    """The message when the refused input is meant for another command: a recipe section (``Option 'data.``, or an ``experiment:``
    section where attack.py's folder belongs) names the command that runs the config; attack.py's ``--experiment DIR`` given to the farm."""
    match = re.search(r"Option '(\w+)\.", detail) or re.search(r'Parser key "(experiment)"', detail)
    section = match[1] if match else ""
    command = RECIPE_COMMANDS.get(section)
    if command == prog and section == "experiment":
        return (f"{prog} --experiment: the farm names its experiment folder in two parts: use --experiment.root DIR --experiment.name NAME; "
                f"attack.py's --experiment takes {FARM_FOLDER}")
    given = _config_given(argv)
    if command in (None, prog) or given is None:
        return None
    config = recipe_reference(given)
    if command == "train.py farm" and _is_fit_config(given):
        message = f"{prog} --config {config}: a LightningCLI config (model, data, trainer; no plan or experiment): run it with `train.py fit --config {config}`"
    else:
        message = f"{prog} --config {config}: its {section}: section makes it a {command.split()[-1]} recipe: run it with `{command} --config {config}`"
    return message if prog in RECIPE_COMMANDS.values() else f"{message}; {prog} takes --experiment DIR, {FARM_FOLDER}"


def _is_fit_config(path: str) -> bool:
    """Whether the YAML file at ``path`` is a mapping without any farm-only section (a ``train.py fit`` config); False if unreadable."""
    import yaml

    try:
        sections = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(sections, dict) and not any(name in sections for name in FARM_ONLY_SECTIONS)


def _config_given(argv: list[str]) -> str | None:
    """The last config file ``argv`` names (``--config X`` or ``--config=X``: the file the refused section came from), or None."""
    named = [value for index in range(len(argv)) if (value := config_value(argv, index)) is not None]
    return named[-1] if named else None
