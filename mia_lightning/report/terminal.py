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

from mia_lightning.contract.io import write_bytes_atomic  # noqa: E402
from mia_lightning.metrics import FPR_LEVELS, RocCurve  # noqa: E402
from mia_lightning.report.cells import interval_key, percent, results_header, results_row, unresolved  # noqa: E402
from mia_lightning.report.table import TableRecord  # noqa: E402


PLOT_POINTS = 400
"""Log-spaced FPR values at which a ROC curve is drawn (a step plot; never millions of vertices)."""


def results_table(records: list[dict], title: str) -> Table:
    """One row per attack output: AUC and TPR@FPR with their bootstrap intervals, flags, epsilon bound; the key names the resampled units."""
    table = Table(title=title, title_justify="left", caption=interval_key(records), caption_justify="left")
    for name in results_header():
        table.add_column(name.replace(" {bootstrap}", ""), justify="left" if name == "attack" else "right", style="bold" if name == "attack" else None)
    for record in records:
        table.add_row(*results_row(record), style="yellow" if unresolved(record, FPR_LEVELS[0]) else None)
    return table


DECISION_COLUMNS = ("attack", "level", "FPR budget (rule)", "precision", "recall", "FPR on audited", "FPR on population")


def decision_rows(records: list[dict]) -> list[list[str]]:
    """Precision / recall at the population-chosen threshold, one row per attack and level that has them."""
    rows = []
    for record in records:
        for level, block in (("sample", record), ("user", record.get("user_level") or {})):
            decision = block.get("precision_recall")
            if decision and "skipped" not in decision:
                precision = "-" if decision["precision"] is None else percent(decision["precision"])
                recall = "-" if decision["recall"] is None else percent(decision["recall"])
                rows.append([record["attack"], level, f"{100 * decision['fpr_budget']:g}% ({decision['rule']})", precision, recall,
                             percent(decision["fpr"] or 0.0), percent(decision["population_fpr"])])
    return rows


def user_level_records(records: list[dict]) -> list[dict]:
    """The user-level metrics of each record, shaped like records (for the same table)."""
    return [{**record["user_level"], "attack": record["attack"]} for record in records if "auc" in (record.get("user_level") or {})]


def skipped_lines(skipped: list[dict]) -> list[str]:
    """'a, b: reason' per distinct reason (attacks that do not apply to this experiment, grouped)."""
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        reason = entry["reason"].removeprefix(f"{entry['attack']}: ")
        by_reason.setdefault(reason, []).append(entry["attack"])
    return [f"{_names(names)}: {reason}" for reason, names in by_reason.items()]


def epsilon_refusal_lines(records: list[dict]) -> list[str]:
    """'no epsilon bound for a, b: reason' per distinct reason an output's empirical epsilon was not computed."""
    by_reason: dict[str, list[str]] = {}
    for record in records:
        eps = record.get("empirical_epsilon") or {}
        if eps.get("epsilon_lower_bound") is None and eps.get("reason"):
            by_reason.setdefault(eps["reason"], []).append(record["attack"])
    return [f"no epsilon bound for {_names(names)}: {reason}" for reason, names in by_reason.items()]


def _names(names: list[str], shown: int = 4) -> str:
    """'a, b, c' or 'a, b, c and 18 more' (a line stays readable when a family writes dozens of outputs)."""
    return ", ".join(names) if len(names) <= shown + 1 else f"{', '.join(names[:shown])} and {len(names) - shown} more"


def fpr_control_lines(records: list[dict]) -> list[str]:
    """One line per output that carries its own decision rule (``fpr_control``): the FPR it was built for against the FPR measured."""
    lines = []
    for record in records:
        control = record.get("fpr_control")
        if control:
            if control.get("fpr_ci_bootstrap"):
                low, high = control["fpr_ci_bootstrap"]
                measured, judged = f" {{{percent(low)}, {percent(high)}}}", "consistent" if control["fpr_consistent"] else "NOT consistent"
            else:
                measured, judged = "", "not judged without bootstrap intervals (--bootstrap 0)"
            lines.append(f"{record['attack']}: built for FPR {percent(control['alpha'])} (calibration range {percent(control['alpha_interval'][0])}-"
                         f"{percent(control['alpha_interval'][1])}); measured FPR {percent(control['fpr'])}{measured}, "
                         f"TPR {percent(control['tpr'])} on the audited pairs: {judged}")
    return lines


def print_results(records: list[dict], title: str, console: Console | None = None) -> None:
    """Print the comparison table (and the user-level and decision tables when the run has them) to the terminal."""
    console = console or Console()
    console.print(results_table(records, title))
    users = user_level_records(records)
    if users:
        console.print(results_table(users, f"user level: a user's score is the {users[0]['reduce']} of their samples' scores ({users[0]['n_users']} users)"))
    rows = decision_rows(records)
    if rows:
        table = Table(title="decisions at a threshold chosen on the population (known non-members)", title_justify="left")
        for name in DECISION_COLUMNS:
            table.add_column(name, justify="left" if name in ("attack", "level") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in fpr_control_lines(records):
        console.print(line, highlight=False, markup=False)


def rich_table(record: TableRecord) -> Table:
    """A ``TableRecord`` as a rich table (title at the left, the record's left-justified columns, the others right)."""
    table = Table(title=record.title, title_justify="left")
    for column in record.header:
        table.add_column(column, justify="left" if column in record.left else "right")
    for row in record.rows:
        table.add_row(*row)
    return table


def print_tables(records: list[TableRecord], console: Console) -> None:
    for record in records:
        console.print(rich_table(record))


ALL_CURVES_FIGURE = "roc_all.png"
"""The run's figure of every output, kept for the record beside the readable headline ``roc.png``."""
LINE_STYLES = ("-", "--", "-.", ":")
BASELINE_OUTPUTS = ("global_threshold", "loss", "loss_baseline", "blind_baseline")
"""Outputs that every headline ROC keeps beside the best of each attack family: what an attack must beat."""
SAME_CURVE_TOLERANCE = 1e-12


def headline_outputs(records: list[dict]) -> list[str]:
    """The outputs a reader needs: the best of each attack family (TPR at 1% FPR, then AUC) and the baselines, in run order."""
    best: dict[str, dict] = {}
    for record in records:
        family = record.get("family", record["attack"])
        rank = (record["tpr_at_fpr"].get("0.01", 0.0), record["auc"])
        if family not in best or rank > (best[family]["tpr_at_fpr"].get("0.01", 0.0), best[family]["auc"]):
            best[family] = record
    chosen = {record["attack"] for record in best.values()} | {r["attack"] for r in records if r["attack"] in BASELINE_OUTPUTS}
    return [record["attack"] for record in records if record["attack"] in chosen]


def coinciding_groups(curves: dict[str, RocCurve], grid: np.ndarray) -> list[list[str]]:
    """Outputs whose ROC curves are identical on ``grid``, grouped in order (a group of one draws alone)."""
    groups: list[tuple[np.ndarray, list[str]]] = []
    for name, curve in curves.items():
        tpr = curve.tpr_at(grid)
        same = next((names for values, names in groups if np.allclose(values, tpr, rtol=0.0, atol=SAME_CURVE_TOLERANCE)), None)
        if same is None:
            groups.append((tpr, [name]))
        else:
            same.append(name)
    return [names for _, names in groups]


def plot_roc(curves: dict[str, RocCurve], path: Path, title: str, auc: dict[str, float] | None = None) -> None:
    """Log-log ROC of one or more attacks with the chance line, as PNG written atomically.

    Each curve is drawn as a step plot at ``PLOT_POINTS`` log-spaced FPRs from the smallest FPR
    the data can resolve (1 / non-members) to 1, so plotting costs the same for 100 or 10^8 pairs.
    Every line has its own colour and line style (never reused), its AUC in the legend, and the
    legend sits outside the axes; curves that coincide are drawn once, named together, and noted.
    """
    floor = min(1.0 / max(curve.n_negatives, 1) for curve in curves.values())
    grid = np.logspace(np.log10(floor), 0.0, PLOT_POINTS)
    y_floor = min(1.0 / max(curve.n_positives, 1) for curve in curves.values())
    groups = coinciding_groups(curves, grid)
    fig, ax = plt.subplots(figsize=(8.5 if len(groups) > 1 else 5.5, 5))
    colours = plt.get_cmap("tab10").colors
    for k, names in enumerate(groups):
        label = " = ".join(names) + (f" (AUC {auc[names[0]]:.3f})" if auc and names[0] in auc else "")
        ax.step(grid, np.maximum(curves[names[0]].tpr_at(grid), y_floor), where="post", label=label, linewidth=1.4,
                color=colours[k % len(colours)], linestyle=LINE_STYLES[(k // len(colours)) % len(LINE_STYLES)])
    ax.plot([floor, 1], [floor, 1], color="0.4", linestyle=(0, (1, 3)), linewidth=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(y_floor, 1), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    merged = [" = ".join(names) for names in groups if len(names) > 1]
    if merged:
        ax.text(0.0, -0.16, "coinciding curves drawn once: " + "; ".join(merged), transform=ax.transAxes, fontsize=7, va="top", wrap=True)
    save_figure(fig, Path(path))


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Lay out, render to PNG in memory and write atomically (a killed run never leaves half a plot)."""
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
