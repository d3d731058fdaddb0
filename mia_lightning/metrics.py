"""Membership-inference metrics over (target, sample) pairs, computed with torchmetrics.

TPR@FPR=x is the largest TPR on the ROC curve among points with FPR <= x; intervals are two-sided
Clopper-Pearson 95%. Balanced accuracy is max over thresholds of 1 - (FPR + FNR) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, rankdata
from torchmetrics.classification import BinaryROC

FPR_LEVELS: tuple[float, ...] = (0.001, 0.01, 0.1)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``successes`` out of ``trials``."""
    if trials == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return (low, high)


def _to_unit_interval(scores: np.ndarray) -> torch.Tensor:
    """Map scores order-preservingly into [0, 1] (dense ranks), so torchmetrics applies no sigmoid and ties stay ties."""
    ranks = rankdata(scores, method="dense").astype(np.float64)
    top = ranks.max() - 1.0
    return torch.from_numpy((ranks - 1.0) / top if top > 0 else np.zeros_like(ranks))


def rank_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic (ties count half), exact in float64.

    Sums of average ranks are multiples of 1/2, so equal ROC areas compare exactly equal (RMIA's
    tuning of ``a`` breaks ties on that).
    """
    ranks = rankdata(scores)
    n_pos, n_neg = int(members.sum()), int((~members).sum())
    return float((ranks[members].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class RocCurve:
    """ROC points (ascending FPR) of one attack."""

    fpr: np.ndarray
    tpr: np.ndarray


def roc_curve(scores: np.ndarray, members: np.ndarray) -> RocCurve:
    """Exact ROC of ``scores`` (higher = member) against boolean ``members`` (1-D, finite scores).

    torchmetrics' ``BinaryROC`` returns float32 rates; they are snapped back to the exact count
    ratios k / N in float64 so that TPR@FPR thresholds and the AUC carry no float32 error.
    """
    fpr, tpr, _ = BinaryROC(thresholds=None)(_to_unit_interval(scores), torch.from_numpy(members.astype(np.int64)))
    n_pos, n_neg = int(members.sum()), int((~members).sum())
    return RocCurve(
        fpr=np.round(fpr.double().numpy() * n_neg) / n_neg,
        tpr=np.round(tpr.double().numpy() * n_pos) / n_pos,
    )


def membership_metrics(scores: np.ndarray, members: np.ndarray, fpr_levels: tuple[float, ...] = FPR_LEVELS) -> dict:
    """AUC, balanced accuracy and TPR@FPR (with Clopper-Pearson 95% intervals) over all pairs."""
    return evaluate_scores(scores, members, fpr_levels)[0]


def evaluate_scores(scores: np.ndarray, members: np.ndarray, fpr_levels: tuple[float, ...] = FPR_LEVELS) -> tuple[dict, RocCurve]:
    """(metrics dict, ROC curve) of ``scores`` against ``members``.

    ``scores`` and ``members`` have the same shape (e.g. [n_targets, n_samples]); pairs whose score
    is NaN are left out (the caller warns about them).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    members = np.asarray(members, dtype=bool).ravel()
    keep = np.isfinite(scores)
    scores, members = scores[keep], members[keep]
    n_members, n_nonmembers = int(members.sum()), int((~members).sum())
    if n_members == 0 or n_nonmembers == 0:
        raise ValueError(f"metrics need members and non-members with finite scores, got {n_members} and {n_nonmembers}")
    curve = roc_curve(scores, members)
    tpr_at, ci_at = {}, {}
    for level in fpr_levels:
        tpr = float(curve.tpr[curve.fpr <= level].max())
        ci_at[str(level)] = list(clopper_pearson(int(round(tpr * n_members)), n_members))
        tpr_at[str(level)] = tpr
    metrics = {
        "n_members": n_members,
        "n_nonmembers": n_nonmembers,
        "auc": rank_auc(scores, members),
        "balanced_accuracy": float(np.max(1.0 - (curve.fpr + (1.0 - curve.tpr)) / 2.0)),
        "tpr_at_fpr": tpr_at,
        "tpr_at_fpr_ci": ci_at,
    }
    return metrics, curve
