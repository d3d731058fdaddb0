"""Cells of a results row, formatted once for every view (terminal, report.md, report.html, study and unlearning tables).

Every view shows the same numbers with the same marks, and prints ``KEY`` (or ``COMPACT_KEY``) under
its table: ``{ }`` the two-way bootstrap 95% interval over the units that were sampled (target models
and samples; users at user level), ``[ ]`` Clopper-Pearson 95% over pairs (too narrow when pairs share
models or samples; full views only), ``(!)`` a TPR at an FPR below the smallest FPR the scores resolve
(ties decide there, so the TPR is not evidence either way).
"""

from __future__ import annotations

from mia_lightning.metrics import FPR_LEVELS

UNRESOLVED = " (!)"
"""Mark of a TPR at an FPR the scores cannot resolve, and of such a resolution in the min FPR column."""

COMPACT_KEY = ("{ } two-way bootstrap 95% over targets and samples (AUC too; users at user level); "
               "(!) the FPR is below the smallest FPR the scores resolve (min FPR): ties decide there, the TPR is not evidence either way; "
               "eps: lower bound (construction, independent trials); Clopper-Pearson intervals over pairs: report.md / report.html")
KEY = ("{ } two-way bootstrap 95% over targets and samples (AUC too; users at user level), the interval to quote; "
       "[ ] Clopper-Pearson 95% over (target, sample) pairs, too narrow when pairs share models or samples; "
       "(!) the FPR is below the smallest FPR the scores resolve (min FPR): ties decide there, the TPR is not evidence either way; "
       "eps: lower bound (construction, independent trials)")


def percent(value: float | None, digits: int = 2) -> str:
    """'4.58%' (``-`` for a missing value)."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def interval(bounds: list[float] | None, brackets: str = "{}", digits: int = 2, scale: float = 100.0) -> str:
    """' {3.61, 5.55}' (percent by default; empty when there is no interval)."""
    return "" if not bounds else f" {brackets[0]}{scale * bounds[0]:.{digits}f}, {scale * bounds[1]:.{digits}f}{brackets[1]}"


def unresolved(record: dict, level: float) -> bool:
    """Whether ``level`` lies below the smallest FPR the record's scores resolve."""
    return level < record.get("min_resolvable_fpr", 0.0)


def tpr_cell(record: dict, level: float, pairs: bool = False) -> str:
    """'4.58% {3.61, 5.55}' (with ``pairs``: '4.58% [4.41, 4.75] {3.61, 5.55}'), marked ``(!)`` where the FPR is not resolved."""
    key = str(level)
    cell = percent(record["tpr_at_fpr"][key])
    if pairs and record.get("tpr_at_fpr_ci"):
        cell += interval(record["tpr_at_fpr_ci"][key], "[]")
    cell += interval((record.get("tpr_at_fpr_ci_bootstrap") or {}).get(key))
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


def results_header(pairs: bool) -> list[str]:
    """Column names of the results table (``pairs``: the full view with Clopper-Pearson intervals)."""
    tpr = "[CP] {bootstrap}" if pairs else "{bootstrap}"
    return ["attack", "AUC {bootstrap}", "bal. acc", *(f"TPR@{100 * level:g}%FPR {tpr}" for level in FPR_LEVELS),
            "eps lower bound", "members / non", "min FPR"]


def results_row(record: dict, pairs: bool) -> list[str]:
    """One results-table row of an attack output, the same in every view."""
    return [record["attack"], auc_cell(record), f"{record['balanced_accuracy']:.4f}", *(tpr_cell(record, level, pairs) for level in FPR_LEVELS),
            epsilon_cell(record), f"{record['n_members']} / {record['n_nonmembers']}", min_fpr_cell(record)]
