"""Rendering of attack results: the rich comparison table and log-log ROC plots."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mia_lightning.io import write_bytes_atomic  # noqa: E402
from mia_lightning.metrics import FPR_LEVELS, RocCurve  # noqa: E402


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def results_table(records: list[dict], title: str) -> Table:
    """One row per attack: AUC, balanced accuracy, TPR@FPR with 95% CI, members / non-members."""
    table = Table(title=title, title_justify="left")
    table.add_column("attack", style="bold")
    table.add_column("AUC", justify="right")
    table.add_column("bal. acc", justify="right")
    for level in FPR_LEVELS:
        table.add_column(f"TPR@{100 * level:g}%FPR [95% CI]", justify="right")
    show_epsilon = any("empirical_epsilon" in record for record in records)
    if show_epsilon:
        table.add_column("eps lower bound", justify="right")
    table.add_column("members / non", justify="right")
    for record in records:
        cells = [record["attack"], f"{record['auc']:.4f}", f"{record['balanced_accuracy']:.4f}"]
        for level in FPR_LEVELS:
            low, high = record["tpr_at_fpr_ci"][str(level)]
            cells.append(f"{_percent(record['tpr_at_fpr'][str(level)])} [{_percent(low)}, {_percent(high)}]")
        if show_epsilon:
            eps = record.get("empirical_epsilon", {}).get("epsilon_lower_bound")
            cells.append("-" if eps is None else f"{eps:.3f}")
        cells.append(f"{record['n_members']} / {record['n_nonmembers']}")
        table.add_row(*cells)
    return table


def print_results(records: list[dict], title: str, console: Console | None = None) -> None:
    """Print the comparison table to the terminal."""
    (console or Console()).print(results_table(records, title))


def plot_roc(curves: dict[str, RocCurve], path: Path, title: str) -> None:
    """Log-log ROC of one or more attacks, with the chance line, written atomically as PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1e-5
    for name, curve in curves.items():
        ax.plot(np.maximum(curve.fpr, floor), np.maximum(curve.tpr, floor), label=name, linewidth=1.4)
    ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    save_figure(fig, Path(path))


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Lay out, render to PNG in memory and write atomically (a killed run never leaves half a plot)."""
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
