"""Cells of a results row, formatted once for every view (terminal, report.md, report.html, study and unlearning tables).

Every view shows the same numbers with the same marks, and prints ``interval_key(records)`` under
its table: ``{ }`` the two-way bootstrap 95% interval over the units that were sampled (target models
and samples, users where samples belong to users; each record names its ``bootstrap_unit``), ``(!)``
a TPR at an FPR below the smallest FPR the scores resolve (ties decide there, so the TPR is not
evidence either way). Clopper-Pearson intervals over pairs stay in results.json only: pairs that
share a model or a user are not independent trials, so no view quotes them.
"""

from __future__ import annotations

from typing import Any

from mia_lightning.metrics import FPR_LEVELS

UNRESOLVED = " (!)"
"""Mark of a TPR at an FPR the scores cannot resolve, and of such a resolution in the min FPR column."""

UNRESOLVED_NOTE = "(!) the FPR is below the smallest FPR the scores resolve (min FPR): ties decide there, the TPR is not evidence either way"
EPSILON_NOTE = "eps: lower bound (construction, independent trials)"


def interval_key(records: list[dict] = ()) -> str:
    """The key printed under a table of ``records``: which units their bootstrap intervals resample, then the marks."""
    units = sorted({record["bootstrap_unit"] for record in records if record.get("bootstrap_unit")})
    over = " and ".join(units) if units else "targets x samples (targets x users where samples belong to users)"
    return f"{{ }} two-way bootstrap 95% over {over} (AUC too), the interval to quote; {UNRESOLVED_NOTE}; {EPSILON_NOTE}"


def percent(value: float | None, digits: int = 2) -> str:
    """'4.58%' (``-`` for a missing value)."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def interval(bounds: list[float] | None, brackets: str = "{}", digits: int = 2, scale: float = 100.0) -> str:
    """' {3.61, 5.55}' (percent by default; empty when there is no interval)."""
    return "" if not bounds else f" {brackets[0]}{scale * bounds[0]:.{digits}f}, {scale * bounds[1]:.{digits}f}{brackets[1]}"


def unresolved(record: dict, level: float) -> bool:
    """Whether ``level`` lies below the smallest FPR the record's scores resolve."""
    return level < record.get("min_resolvable_fpr", 0.0)


def tpr_cell(record: dict, level: float) -> str:
    """'4.58% {3.61, 5.55}', marked ``(!)`` where the FPR is not resolved."""
    key = str(level)
    cell = percent(record["tpr_at_fpr"][key]) + interval((record.get("tpr_at_fpr_ci_bootstrap") or {}).get(key))
    return cell + (UNRESOLVED if unresolved(record, level) else "")


def min_fpr_cell(record: dict) -> str:
    """'0.111% (!)': the smallest FPR the scores resolve, marked when it is above the lowest reported level."""
    value = record.get("min_resolvable_fpr", 0.0)
    return f"{100 * value:.3g}%" + (UNRESOLVED if value > FPR_LEVELS[0] else "")


def auc_cell(record: dict) -> str:
    """'0.6573 {0.6401, 0.6745}': the AUC and its two-way bootstrap 95% interval when the run has one."""
    return f"{record['auc']:.4f}" + interval(record.get("auc_ci_bootstrap"), digits=4, scale=1.0)


def epsilon_cell(record: dict) -> str:
    """'1.234 (runs, 32)': the empirical epsilon lower bound, its construction and its number of independent trials."""
    eps = record.get("empirical_epsilon") or {}
    if eps.get("epsilon_lower_bound") is None:
        return "-"
    method = {"independent_runs": "runs", "one_run": "one run"}.get(eps.get("method"), eps.get("method"))
    return f"{eps['epsilon_lower_bound']:.3f} ({method}, {eps.get('n_trials', '?')})"


FEW_SHADOW_KEY = "AUC / TPR@0.1%FPR / TPR@1%FPR with k shadow / reference models (the k lowest ids other than the target)"


def few_shadow_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the few-shadow curve: one row per shadow count k, one ``FEW_SHADOW_KEY`` cell per output (``-`` where nothing was scored)."""
    names = list(dict.fromkeys(row["attack"] for row in rows))
    points = {(row["n_shadows"], row["attack"]): row for row in rows}

    def cell(point: dict | None) -> str:
        return "-" if point is None or point["auc"] is None else f"{point['auc']:.3f} / {percent(point['tpr@0.001'])} / {percent(point['tpr@0.01'])}"

    counts = sorted({row["n_shadows"] for row in rows})
    return ["shadows", *names], [[str(k), *(cell(points.get((k, name))) for name in names)] for k in counts]


def results_header() -> list[str]:
    """Column names of the results table."""
    return ["attack", "AUC {bootstrap}", "bal. acc", *(f"TPR@{100 * level:g}%FPR {{bootstrap}}" for level in FPR_LEVELS),
            "eps lower bound", "members / non", "min FPR"]


def results_row(record: dict) -> list[str]:
    """One results-table row of an attack output, the same in every view."""
    return [record["attack"], auc_cell(record), f"{record['balanced_accuracy']:.4f}", *(tpr_cell(record, level) for level in FPR_LEVELS),
            epsilon_cell(record), f"{record['n_members']} / {record['n_nonmembers']}", min_fpr_cell(record)]


def utility_line(utility: dict[str, Any]) -> str:
    """One line of utility.json for the console and reports: test accuracy, train accuracy and the gap ("-" where utility.json holds null: no held-out sample)."""
    def hundredths(value: float | None, unit: str = "") -> str:
        return "-" if value is None or value != value else f"{100 * value:.2f}{unit}"

    n = len(utility["targets"])
    spread = f" (sd {hundredths(utility['test_accuracy_std'])} over targets)" if n > 1 else ""
    who = f"the {n} targets" if n > 1 else f"target {utility['targets'][0]}"
    return (f"utility of {who}: test accuracy {hundredths(utility['test_accuracy'], '%')}{spread}, "
            f"train {hundredths(utility['train_accuracy'], '%')}, gap {hundredths(utility['train_test_gap'], ' points')}")
