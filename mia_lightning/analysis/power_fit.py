"""The regressions of the power-law study: log10 advantage on log10 S and log10 C, weighted by the attack's own intervals.

Tobaben et al. (NeurIPS 2025) model the attacker's advantage at a fixed FPR x,

    log10(TPR@x - x) = b_S log10 S + b_C log10 C + b_0,

and their simplified model of fine-tuning predicts b_S -> -1/2: the advantage falls as 1 / sqrt(S)
once S is large. ``log10 TPR@x`` is fitted beside it as a secondary column (the project's earlier
regressand; it flattens towards log10 x where TPR approaches the FPR).

A *cell* is one audited experiment (one S, C, class subset and data draw). Which cells enter a fit
at level x (``exclusion``): the scores must resolve FPR x (``min_resolvable_fpr <= x``), the TPR must
be below ``SATURATED_TPR`` (a saturated cell carries no slope) and the advantage must be positive
(its log exists). Excluded cells are listed with the reason, never floored.

Weights: each cell's response has the variance of its two-way (targets x samples) bootstrap
interval, carried to the log scale by the delta method (se = the interval's larger half-width / 1.96,
var = (se / (value ln 10))^2; the metrics clip TPR +- 1.96 sd to [0, 1], so the side that was not
clipped carries the whole sd); cells differ beyond that (class subsets, draws), so the weight is
1 / (var + tau^2) with tau^2 the between-cell variance left after the within-cell part (the
method-of-moments estimate max(0, mean squared OLS residual x n / (n - p) - mean var)). Coefficient
intervals: percentile bootstrap over cells (resampled with replacement, the weighted fit redone per
replicate), so the between-draw spread enters them too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

SATURATED_TPR = 0.95
"""A cell whose TPR@x reaches this is saturated: it is dropped from the fit at level x."""
QUANTITIES: dict[str, str] = {"advantage": "log10(TPR - FPR)", "tpr": "log10 TPR"}
"""Regressands: the paper's advantage (the headline) and log TPR (secondary)."""
Z95 = 1.959963984540054


def design_matrix(shots: np.ndarray, classes: np.ndarray, with_classes: bool = True, interaction: bool = False) -> np.ndarray:
    """Columns [log10 S, (log10 C), (log10 S x log10 C), 1]."""
    log_s, log_c = np.log10(np.asarray(shots, dtype=np.float64)), np.log10(np.asarray(classes, dtype=np.float64))
    columns = [log_s] + ([log_c] if with_classes else []) + ([log_s * log_c] if interaction else []) + [np.ones(len(log_s))]
    return np.column_stack(columns)


def weighted_least_squares(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray | None:
    """Coefficients minimising sum w (y - X b)^2, or None when the design is rank-deficient (not identifiable)."""
    if X.shape[0] < X.shape[1] or np.linalg.matrix_rank(X) < X.shape[1]:
        return None
    root = np.ones(len(y)) if w is None else np.sqrt(w)
    return np.linalg.lstsq(X * root[:, None], y * root, rcond=None)[0]


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SS_res / SS_tot (unweighted; NaN when y does not vary)."""
    total = float(((y - y.mean()) ** 2).sum())
    return float("nan") if total == 0 else 1.0 - float(((y - predicted) ** 2).sum()) / total


def leave_one_out_r_squared(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """Predictive R^2: every cell predicted by the weighted fit on all the others (NaN if some fit is not identifiable)."""
    predictions = np.empty_like(y)
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        beta = weighted_least_squares(X[others], y[others], None if w is None else w[others])
        if beta is None:
            return float("nan")
        predictions[i] = X[i] @ beta
    return r_squared(y, predictions)


def bootstrap_intervals(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, replicates: int, seed: int) -> tuple[np.ndarray, int]:
    """Percentile 95% intervals [k, 2] of the coefficients over cell-resampling replicates (rank-deficient draws skipped), and the replicates used."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        pick = rng.integers(0, len(y), len(y))
        beta = weighted_least_squares(X[pick], y[pick], None if w is None else w[pick])
        if beta is not None:
            draws.append(beta)
    if not draws:
        return np.full((X.shape[1], 2), np.nan), 0
    return np.percentile(np.asarray(draws), [2.5, 97.5], axis=0).T, len(draws)


def between_cell_variance(X: np.ndarray, y: np.ndarray, variance: np.ndarray) -> float:
    """tau^2: the residual variance of the unweighted fit beyond the cells' own (bootstrap) variance, floored at 0."""
    beta = weighted_least_squares(X, y)
    if beta is None or len(y) <= X.shape[1]:
        return 0.0
    residual = y - X @ beta
    return max(0.0, float(residual @ residual) / (len(y) - X.shape[1]) - float(np.mean(variance)))


def interaction_test(shots: np.ndarray, classes: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict:
    """F-test of adding log10 S x log10 C to the weighted fit (does the slope in S depend on C?)."""
    small, large = design_matrix(shots, classes), design_matrix(shots, classes, interaction=True)
    beta_small, beta_large = weighted_least_squares(small, y, w), weighted_least_squares(large, y, w)
    dof = len(y) - large.shape[1]
    if beta_small is None or beta_large is None or dof < 1:
        return {"coefficient": None, "f": None, "p_value": None, "reason": "too few cells or class counts for the interaction"}
    rss_small, rss_large = float(w @ (y - small @ beta_small) ** 2), float(w @ (y - large @ beta_large) ** 2)
    f = (rss_small - rss_large) / (rss_large / dof) if rss_large > 0 else float("inf")
    return {"coefficient": float(beta_large[2]), "f": float(f), "p_value": float(stats.f.sf(f, 1, dof)), "dof": dof}


def fit_log_linear(shots: np.ndarray, classes: np.ndarray, y: np.ndarray, variance: np.ndarray | None, replicates: int, seed: int) -> dict:
    """The weighted fit of y on log10 S (and log10 C when it varies): coefficients, bootstrap intervals, R^2, per-C slopes and the S x C test.

    ``variance``: each cell's own variance of y (None: unweighted). Returns ``{"error": ...}`` when
    the cells do not identify the fit.
    """
    with_classes = np.unique(classes).size > 1
    X = design_matrix(shots, classes, with_classes)
    names = ["b_S", "b_C", "b_0"] if with_classes else ["b_S", "b_0"]
    if weighted_least_squares(X, y) is None:
        return {"error": f"{len(y)} usable cells with {np.unique(shots).size} shot values: not enough to fit"}
    tau2 = between_cell_variance(X, y, variance) if variance is not None else None
    w = None
    if variance is not None and (variance + tau2 > 0).all():
        w = 1.0 / (variance + tau2)
    beta = weighted_least_squares(X, y, w)
    intervals, used = bootstrap_intervals(X, y, w, replicates, seed)
    result: dict[str, Any] = {
        "coefficients": {**dict(zip(names, map(float, beta))), **({} if with_classes else {"b_C": None})},
        "ci95_bootstrap": {name: [float(lo), float(hi)] for name, (lo, hi) in zip(names, intervals)},
        "bootstrap_replicates": used,
        "weights": "unweighted" if w is None else "1 / (bootstrap variance + between-cell variance)",
        "between_cell_variance": tau2,
        "r2_fit": r_squared(y, X @ beta),
        "r2_leave_one_out": leave_one_out_r_squared(X, y, w),
        "range": {"shots": [float(shots.min()), float(shots.max())], "classes": [float(classes.min()), float(classes.max())]},
    }
    if with_classes:
        per_class = {}
        for c in np.unique(classes):
            at = classes == c
            Xc = design_matrix(shots[at], classes[at], with_classes=False)
            beta_c = weighted_least_squares(Xc, y[at], None if w is None else w[at])
            if beta_c is not None and np.unique(shots[at]).size > 1:
                ci, _ = bootstrap_intervals(Xc, y[at], None if w is None else w[at], replicates, seed)
                per_class[str(int(c))] = {"b_S": float(beta_c[0]), "ci95_bootstrap": [float(ci[0, 0]), float(ci[0, 1])], "n_cells": int(at.sum())}
        result["per_class"] = per_class
        result["interaction"] = interaction_test(shots, classes, y, np.ones(len(y)) if w is None else w)
    return result


def response(tpr: float, level: float, quantity: str) -> float:
    """The regressand of one cell: log10(TPR - FPR) or log10 TPR."""
    return float(np.log10(tpr - level if quantity == "advantage" else tpr))


def response_variance(tpr: float, interval: list[float] | None, level: float, quantity: str) -> float:
    """Delta-method variance of the regressand from the metrics' 95% interval TPR +- 1.96 sd clipped to [0, 1] (NaN without one).

    sd is the larger half-width / 1.96: a clipped side understates it (at TPR 0.002 with sd 0.002, the
    full width would give sd 0.0015).
    """
    if not interval:
        return float("nan")
    se = max(interval[1] - tpr, tpr - interval[0]) / Z95
    value = tpr - level if quantity == "advantage" else tpr
    return float((se / (value * np.log(10))) ** 2)


def exclusion(cell: dict, level: float, quantity: str) -> str | None:
    """Why ``cell`` stays out of the fit at ``level`` (None: it enters): unresolved FPR, saturated TPR, or no positive response."""
    tpr = cell["tpr_at_fpr"][str(level)]
    if cell["min_resolvable_fpr"] > level:
        return f"scores resolve FPR >= {cell['min_resolvable_fpr']:.2g} only ({cell['n_nonmembers']} non-member pairs)"
    if tpr >= SATURATED_TPR:
        return f"saturated (TPR {tpr:.3f} >= {SATURATED_TPR})"
    if (tpr - level if quantity == "advantage" else tpr) <= 0:
        return "TPR - FPR <= 0 (log undefined)" if quantity == "advantage" else "TPR 0 (log undefined)"
    return None


def fit_power_law(cells: list[dict], level: float, replicates: int = 2000, seed: int = 0, quantity: str = "advantage") -> dict:
    """The weighted fit of ``quantity`` at FPR ``level`` over the cells that pass ``exclusion`` (see the module docstring)."""
    key = str(level)
    used, excluded = [], []
    for cell in cells:
        reason = exclusion(cell, level, quantity)
        if reason:
            excluded.append({"setting": cell["setting"], "reason": reason})
        else:
            used.append(cell)
    result: dict[str, Any] = {"fpr": level, "quantity": QUANTITIES[quantity], "n_settings": len(used), "excluded": excluded,
                              "settings": [c["setting"] for c in used]}
    if not used:
        return {**result, "error": "no usable cells"}
    shots = np.asarray([c["shots"] for c in used], dtype=np.float64)
    classes = np.asarray([c["n_classes"] for c in used], dtype=np.float64)
    y = np.asarray([response(c["tpr_at_fpr"][key], level, quantity) for c in used])
    variance = np.asarray([response_variance(c["tpr_at_fpr"][key], (c.get("tpr_at_fpr_ci_bootstrap") or {}).get(key), level, quantity) for c in used])
    return {**result, **fit_log_linear(shots, classes, y, None if np.isnan(variance).any() else variance, replicates, seed)}


def predict(fit: dict, cells: list[dict], level: float, quantity: str = "advantage") -> dict:
    """How well ``fit`` (from one scenario) predicts the usable cells of another: RMSE and bias (mean predicted - measured) in dex, R^2.

    Also counts the cells outside the fitted range of S and C (extrapolation: the fit makes no claim there),
    and keeps each usable cell's predicted and measured regressand (for the predicted-vs-measured plot).
    """
    key = str(level)
    usable = [c for c in cells if exclusion(c, level, quantity) is None]
    coefficients = fit.get("coefficients")
    if not coefficients or len(usable) < 2:
        return {"fpr": level, "n_cells": len(usable), "rmse": None, "bias": None, "r2": None, "reason": fit.get("error") or "fewer than 2 usable cells"}
    shots = np.asarray([c["shots"] for c in usable], dtype=np.float64)
    classes = np.asarray([c["n_classes"] for c in usable], dtype=np.float64)
    y = np.asarray([response(c["tpr_at_fpr"][key], level, quantity) for c in usable])
    predicted = coefficients["b_S"] * np.log10(shots) + (coefficients.get("b_C") or 0.0) * np.log10(classes) + coefficients["b_0"]
    s_range, c_range = fit["range"]["shots"], fit["range"]["classes"]
    outside = (shots < s_range[0]) | (shots > s_range[1]) | (classes < c_range[0]) | (classes > c_range[1])
    return {"fpr": level, "n_cells": len(usable), "rmse": float(np.sqrt(np.mean((predicted - y) ** 2))), "bias": float(np.mean(predicted - y)),
            "r2": r_squared(y, predicted), "outside_fitted_range": int(outside.sum()),
            "cells": [c["setting"] for c in usable], "predicted": predicted.tolist(), "measured": y.tolist()}


def sample_advantages(scores: np.ndarray, members: np.ndarray, level: float) -> np.ndarray:
    """float64 [n]: each sample's own advantage TPR - FPR at FPR ``level``, from the targets that did and did not train on it.

    Per sample j the threshold is its (floor(level x n_out) + 1)-th highest non-member score, so at
    most ``level`` of its non-member targets score above it; TPR and FPR are the fractions of its
    member / non-member targets above the threshold. Unscored pairs (NaN, as everywhere in the
    metrics) are left out of both. NaN where j has fewer than 1 / level scored non-member targets
    (the FPR is not resolved) or no scored member target.
    """
    scored = np.isfinite(scores)
    member, nonmember = members & scored, ~members & scored
    n_in, n_out = member.sum(axis=0), nonmember.sum(axis=0)
    out_sorted = -np.sort(-np.where(nonmember, scores, -np.inf), axis=0)
    rank = np.minimum(np.floor(level * n_out).astype(np.int64), scores.shape[0] - 1)
    threshold = out_sorted[rank, np.arange(scores.shape[1])]
    above = scored & (scores > threshold)
    tpr = np.divide((above & member).sum(axis=0), n_in, out=np.zeros(scores.shape[1]), where=n_in > 0)
    fpr = np.divide((above & nonmember).sum(axis=0), n_out, out=np.zeros(scores.shape[1]), where=n_out > 0)
    return np.where((n_out >= 1.0 / level) & (n_in > 0), tpr - fpr, np.nan)


def fit_sample_quantiles(cells: list[dict], quantiles: tuple[float, ...], level: float, replicates: int, seed: int) -> list[dict]:
    """Per quantile q of the per-sample advantages (``cell["sample_advantages"]``), the unweighted fit of log10 quantile on log S and log C.

    A cell enters at quantile q if its quantile advantage is positive and below ``SATURATED_TPR`` - level.
    """
    fits = []
    for q in quantiles:
        values = [(c, float(np.nanquantile(c["sample_advantages"], q))) for c in cells if np.isfinite(c["sample_advantages"]).any()]
        used = [(c, v) for c, v in values if 0 < v < SATURATED_TPR - level]
        result: dict[str, Any] = {"quantile": q, "fpr": level, "n_settings": len(used), "n_excluded": len(cells) - len(used)}
        if len(used) < 3:
            fits.append({**result, "error": "fewer than 3 usable cells"})
            continue
        shots = np.asarray([c["shots"] for c, _ in used], dtype=np.float64)
        classes = np.asarray([c["n_classes"] for c, _ in used], dtype=np.float64)
        fit = fit_log_linear(shots, classes, np.log10([v for _, v in used]), None, replicates, seed)
        fits.append({**result, **{k: fit[k] for k in ("coefficients", "ci95_bootstrap", "r2_fit", "error") if k in fit}})
    return fits
