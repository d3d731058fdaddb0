"""Empirical epsilon: a statistical lower bound on the epsilon of any (epsilon, delta)-DP guarantee.

An (epsilon, delta)-DP training run forces every membership test to satisfy
TPR <= e^epsilon FPR + delta and TNR <= e^epsilon FNR + delta (Kairouz et al. 2015), so observed
error rates bound epsilon from below (Jagielski et al., "Auditing Differentially Private Machine
Learning: How Private is Private SGD?", NeurIPS 2020; Nasr et al., "Adversary Instantiation: Lower
Bounds for Differentially Private Machine Learning", S&P 2021). As in DESIGN.md ("Empirical
epsilon"): the (target, sample) pairs are split in two halves with a seeded permutation; the
score threshold ("member" iff score >= threshold) that maximises the bound on half A is applied to
half B, whose counts give

    eps_lb = max(log((TPR_low - delta) / FPR_high), log((TNR_low - delta) / FNR_high), 0)

with one-sided Clopper-Pearson bounds at ``confidence`` (lower for TPR and TNR, upper for FPR and
FNR). Choosing the threshold on A keeps the bound on B valid at that confidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta


def clopper_pearson_lower(successes: np.ndarray, trials: int, confidence: float) -> np.ndarray:
    """One-sided exact binomial lower bound on successes / trials, holding with probability ``confidence``.

    Vectorised over ``successes``; each distinct count is evaluated once (the threshold search asks
    for up to a quarter million). 0 successes (or no trials) give 0. The matching upper bound is
    1 - lower(trials - successes), by the symmetry of the beta distribution.
    """
    values, inverse = np.unique(np.asarray(successes, dtype=np.int64), return_inverse=True)
    safe = np.maximum(values, 1)
    low = np.where(values > 0, beta.ppf(1.0 - confidence, safe, np.maximum(trials - values + 1, 1)), 0.0)
    return low[inverse].reshape(np.shape(successes))


def epsilon_bound(tp: np.ndarray, tn: np.ndarray, n_pos: int, n_neg: int, delta: float, confidence: float) -> np.ndarray:
    """eps_lb from the true positives and true negatives among ``n_pos`` members and ``n_neg`` non-members.

    Vectorised over thresholds; 0 where neither direction of the test gives a positive bound.
    """
    tpr_low = clopper_pearson_lower(tp, n_pos, confidence)
    tnr_low = clopper_pearson_lower(tn, n_neg, confidence)
    fnr_high, fpr_high = 1.0 - tpr_low, 1.0 - tnr_low
    with np.errstate(divide="ignore"):
        members_found = np.log(np.maximum(tpr_low - delta, 0.0) / fpr_high)
        nonmembers_found = np.log(np.maximum(tnr_low - delta, 0.0) / fnr_high)
    return np.maximum(np.maximum(members_found, nonmembers_found), 0.0)


def _counts_at_thresholds(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, tp, tn) for "member iff score >= threshold" at every distinct score."""
    order = np.argsort(-scores, kind="stable")
    ranked, positive = scores[order], members[order]
    last_of_tie = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(~positive)[last_of_tie]
    return ranked[last_of_tie], tp, np.count_nonzero(~positive) - fp


def empirical_epsilon(
    scores: np.ndarray,
    members: np.ndarray,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    dp_epsilon: float | None = None,
) -> dict[str, Any]:
    """Empirical epsilon lower bound of an attack's scores (any shape; non-finite scores are dropped).

    Returns {"epsilon_lower_bound", "delta", "confidence", "threshold", "counts": {"tp", "fp", "tn", "fn"}
    on the evaluation half, "seed"}, plus "theoretical_epsilon" (the accountant's epsilon of DP
    training) when ``dp_epsilon`` is given, so the two can be reported side by side.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    finite = np.isfinite(scores)
    scores, members = scores[finite], members[finite]
    order = np.random.default_rng(seed).permutation(scores.size)
    select, evaluate = order[: scores.size // 2], order[scores.size // 2 :]
    thresholds, tp_a, tn_a = _counts_at_thresholds(scores[select], members[select])
    n_pos_a = int(members[select].sum())
    bounds = epsilon_bound(tp_a, tn_a, n_pos_a, select.size - n_pos_a, delta, confidence)
    threshold = float(thresholds[np.argmax(bounds)])
    predicted, truth = scores[evaluate] >= threshold, members[evaluate]
    tp, fp = int(np.sum(predicted & truth)), int(np.sum(predicted & ~truth))
    tn, fn = int(np.sum(~predicted & ~truth)), int(np.sum(~predicted & truth))
    result: dict[str, Any] = {
        "epsilon_lower_bound": float(epsilon_bound(tp, tn, tp + fn, tn + fp, delta, confidence)),
        "delta": delta,
        "confidence": confidence,
        "threshold": threshold,
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "seed": seed,
    }
    if dp_epsilon is not None:
        result["theoretical_epsilon"] = float(dp_epsilon)
    return result
