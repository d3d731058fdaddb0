"""Which models of a farm are done, running, stale (dead claim) or missing: ``train.py farm --status``, the runner and study status read it without torch."""

from __future__ import annotations

from typing import Iterable

from rich.console import Console
from rich.table import Table

from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.identity import DONE_FILE
from mia_lightning.farm.locks import claim_state


def is_done(experiment: ExperimentDir, index: int) -> bool:
    """Whether model ``index`` is finished (its ``done.json``, written last, exists)."""
    return (experiment.model_dir(index) / DONE_FILE).is_file()


def pending_models(experiment: ExperimentDir, indices: Iterable[int]) -> list[int]:
    """The models among ``indices`` without a ``done.json`` (in the given order)."""
    return [i for i in indices if not is_done(experiment, i)]


def farm_status(experiment: ExperimentDir, n_models: int, stale_after_s: float) -> dict[str, list[int]]:
    """Model ids grouped by state."""
    states: dict[str, list[int]] = {"done": [], "running": [], "stale": [], "missing": []}
    for index in range(n_models):
        if is_done(experiment, index):
            states["done"].append(index)
            continue
        claim = claim_state(experiment.model_dir(index), stale_after_s)
        states["missing" if claim == "free" else claim].append(index)
    return states


def _ranges(ids: list[int]) -> str:
    """Compact '0-3, 7, 9-12' form of sorted ids."""
    parts, start = [], None
    for position, value in enumerate(ids):
        if start is None:
            start = value
        if position + 1 == len(ids) or ids[position + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts) or "-"


def print_status(states: dict[str, list[int]], console: Console | None = None) -> None:
    table = Table(title="farm status", title_justify="left")
    table.add_column("state", style="bold")
    table.add_column("models", justify="right")
    table.add_column("ids")
    for state, ids in states.items():
        table.add_row(state, str(len(ids)), _ranges(ids))
    (console or Console()).print(table)
