"""A measured ROC against (epsilon, delta)-DP: the regions a DP mechanism confines every test to, read only where the scores resolve.

Every test against an (eps, delta)-DP mechanism satisfies TPR <= e^eps FPR + delta and
1 - FPR <= e^eps (1 - TPR) + delta (Kairouz, Oh and Viswanath, "The Composition Theorem for
Differential Privacy", ICML 2015), for the neighbouring relation the guarantee is stated in.

Adjacency: DP-SGD accountants (opacus) state add/remove-one guarantees, while a membership game on
a plan whose training sets all have the same size (few-shot, LiRA halves) compares *replace-one*
neighbours; an add/remove (eps, delta) guarantee gives replace-one (2 eps, (1 + e^eps) delta), and
that is the region ``replace_one`` draws and compares.

Resolution: a vertex with 3 false positives says little about an FPR of 1e-5, so an inequality is
read at a vertex only when both of its counts are at least ``MIN_EVENTS`` (the first: false and true
positives; the second: false and true negatives). ``curve_epsilon`` gives the smallest epsilon
whose region contains the resolved vertices (point estimates); ``curve_epsilon_clopper_pearson``
the same with each rate replaced by its one-sided Clopper-Pearson bound in the adverse direction
(``privacy.epsilon.clopper_pearson_lower``). Both count (target, sample) pairs as trials and take a
maximum over vertices, so they are descriptive, not a lower bound at a stated confidence (that is
``privacy.epsilon``'s job).
"""

from __future__ import annotations

import math

import numpy as np

from mia_lightning.metrics import RocCurve
from mia_lightning.privacy.epsilon import clopper_pearson_lower

MIN_EVENTS = 10
"""Counts both rates of an inequality need at a vertex before it is read."""
ADJACENCY_NOTE = "few-shot plans are replace-one: an add/remove (eps, delta) guarantee is drawn as replace-one (2 eps, (1 + e^eps) delta)"


def replace_one(epsilon: float, delta: float) -> tuple[float, float]:
    """The replace-one guarantee implied by an add/remove (epsilon, delta) one: (2 eps, (1 + e^eps) delta)."""
    return 2.0 * epsilon, (1.0 + math.exp(epsilon)) * delta if math.isfinite(epsilon) else 1.0


def dp_tpr_bound(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR any test can reach at ``fpr`` against an (epsilon, delta)-DP mechanism (both inequalities, capped at 1)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    with np.errstate(over="ignore"):
        first = np.exp(epsilon) * fpr + delta
        symmetric = 1.0 - np.exp(-epsilon) * (1.0 - delta - fpr)
    return np.clip(np.minimum(first, symmetric), 0.0, 1.0)


def _counts(fpr: np.ndarray, tpr: np.ndarray, n_positives: int, n_negatives: int) -> tuple[np.ndarray, ...]:
    tp, fp = np.rint(np.asarray(tpr) * n_positives), np.rint(np.asarray(fpr) * n_negatives)
    return tp, fp, n_positives - tp, n_negatives - fp


def resolved(fpr: np.ndarray, tpr: np.ndarray, n_positives: int, n_negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """bool masks: vertices where the first inequality (fp, tp >= MIN_EVENTS) and the second (fn, tn >= MIN_EVENTS) are read."""
    tp, fp, fn, tn = _counts(fpr, tpr, n_positives, n_negatives)
    return (fp >= MIN_EVENTS) & (tp >= MIN_EVENTS), (fn >= MIN_EVENTS) & (tn >= MIN_EVENTS)


def _epsilon(tpr_low: np.ndarray, fpr_high: np.ndarray, tnr_low: np.ndarray, fnr_high: np.ndarray, first: np.ndarray, second: np.ndarray, delta: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(first & (tpr_low - delta > 0), np.log((tpr_low - delta) / fpr_high), 0.0)
        b = np.where(second & (tnr_low - delta > 0), np.log((tnr_low - delta) / fnr_high), 0.0)
    return float(max(0.0, a.max(initial=0.0), b.max(initial=0.0)))


def curve_epsilon(fpr: np.ndarray, tpr: np.ndarray, delta: float, n_positives: int, n_negatives: int) -> float:
    """The smallest epsilon whose (epsilon, delta) region contains every resolved ROC vertex (point estimates of the rates)."""
    first, second = resolved(fpr, tpr, n_positives, n_negatives)
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return _epsilon(tpr, fpr, 1 - fpr, 1 - tpr, first, second, delta)


def curve_epsilon_clopper_pearson(fpr: np.ndarray, tpr: np.ndarray, delta: float, n_positives: int, n_negatives: int, confidence: float = 0.95) -> float:
    """``curve_epsilon`` with each rate at its one-sided Clopper-Pearson bound in the adverse direction (pairs as trials: descriptive)."""
    first, second = resolved(fpr, tpr, n_positives, n_negatives)
    tp, fp, fn, tn = _counts(fpr, tpr, n_positives, n_negatives)
    tpr_low, tnr_low = clopper_pearson_lower(tp, n_positives, confidence), clopper_pearson_lower(tn, n_negatives, confidence)
    fpr_high, fnr_high = 1 - tnr_low, 1 - tpr_low
    return _epsilon(tpr_low, fpr_high, tnr_low, fnr_high, first, second, delta)


ADD_REMOVE_BISECTION_STEPS = 40


def add_remove_epsilon(fpr: np.ndarray, tpr: np.ndarray, delta: float, n_positives: int, n_negatives: int) -> float:
    """The smallest add/remove eps whose replace-one region (2 eps, (1 + e^eps) delta) contains every resolved vertex (point estimates).

    Half of ``curve_epsilon`` at ``delta`` overstates it: the replace-one delta grows with eps, and a larger delta needs a
    smaller eps. ``curve_epsilon`` falls as its delta grows while 2 eps rises, so the answer is found by bisection below
    that half (which always fits), to within 2^-40 of it.
    """
    low, high = 0.0, curve_epsilon(fpr, tpr, delta, n_positives, n_negatives) / 2
    for _ in range(ADD_REMOVE_BISECTION_STEPS):
        middle = (low + high) / 2
        if curve_epsilon(fpr, tpr, (1.0 + math.exp(middle)) * delta, n_positives, n_negatives) <= 2 * middle:
            high = middle
        else:
            low = middle
    return high


def compare(curve: RocCurve, bounds: list[tuple[float, float]]) -> dict:
    """A ROC (``metrics.RocCurve``) against add/remove (eps, delta) guarantees read as replace-one regions, at resolved vertices only.

    Returns per bound whether the resolved vertices stay inside and the worst excess, and the
    replace-one epsilon of the curve (point estimate and Clopper-Pearson) per delta, with the
    add/remove epsilon it implies at least (``add_remove_epsilon``).
    """
    first, second = resolved(curve.fpr, curve.tpr, curve.n_positives, curve.n_negatives)
    read = first | second
    fpr, tpr = curve.fpr[read], curve.tpr[read]
    comparisons = []
    for epsilon, delta in bounds:
        eps_r, delta_r = replace_one(epsilon, delta)
        with np.errstate(over="ignore"):  # each inequality only where its counts are resolved
            excess = np.maximum(np.where(first[read], tpr - (np.exp(eps_r) * fpr + delta_r), -np.inf),
                                np.where(second[read], tpr - (1.0 - np.exp(-eps_r) * (1.0 - delta_r - fpr)), -np.inf)) if fpr.size else np.zeros(1)
        worst = int(np.argmax(excess))
        comparisons.append({"epsilon": epsilon, "delta": delta, "replace_one": [eps_r, delta_r], "curve_inside": bool(excess.max() <= 1e-12),
                            "max_excess": float(excess.max()), "at_fpr": float(fpr[worst]) if fpr.size else None, "tpr": float(tpr[worst]) if fpr.size else None})
    epsilons = {}
    for delta in sorted({d for _, d in bounds}):
        point = curve_epsilon(curve.fpr, curve.tpr, delta, curve.n_positives, curve.n_negatives)
        cp = curve_epsilon_clopper_pearson(curve.fpr, curve.tpr, delta, curve.n_positives, curve.n_negatives)
        epsilons[str(delta)] = {"replace_one": point, "replace_one_clopper_pearson": cp, "add_remove_at_least": add_remove_epsilon(curve.fpr, curve.tpr, delta, curve.n_positives, curve.n_negatives)}
    return {"bounds": comparisons, "curve_epsilon": epsilons, "n_nonmembers": curve.n_negatives, "n_members": curve.n_positives,
            "min_events": MIN_EVENTS, "adjacency": ADJACENCY_NOTE}


def bound_text(bound: dict) -> str:
    """One comparison of ``compare`` as text: whether the resolved vertices stay inside the region, else by how much they leave it and where."""
    where = "inside" if bound["curve_inside"] else f"left by {bound['max_excess']:.3f} TPR at FPR {bound['at_fpr']:.2g}"
    return f"({bound['epsilon']:.3g}, {bound['delta']:.3g}): {where}"


def bound_curves(bounds: list[tuple[float, float]], grid: np.ndarray | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, fpr grid, TPR bound) of each add/remove (eps, delta) guarantee drawn as its replace-one region."""
    grid = np.logspace(-5, 0, 400) if grid is None else grid
    curves = []
    for epsilon, delta in bounds:
        eps_r, delta_r = replace_one(epsilon, delta)
        curves.append((f"({epsilon:g}, {delta:g})-DP add/remove = replace-one ({eps_r:g}, {delta_r:.2g})", grid, dp_tpr_bound(grid, eps_r, delta_r)))
    return curves
