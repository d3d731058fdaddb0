"""``train.py farm --status``: which models are done, running, stale (dead claim) or missing."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.locks import claim_state
from mia_lightning.farm.runner import is_done


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
