"""The vectorised bootstrap scan equals a replicate-by-replicate bootstrap written from value bins, to 1e-9.

``metrics.bootstrap_intervals`` scans all replicates together, block by block, only as far down the
sorted order as each needs. The reference below shares nothing with it but the Poisson draws: per
replicate, pair weights u_t v_j, weighted member / non-member totals per distinct score
(``np.unique`` + ``np.bincount``), TPR@FPR as the best TPR over thresholds whose FPR is within the
level, and the weighted Mann-Whitney AUC (ties half).
"""

from __future__ import annotations

import numpy as np
import pytest

import mia_lightning.metrics as metrics_module
from mia_lightning.metrics import FPR_LEVELS, evaluate_scores

Z = 1.959964


def reference_draws(scores: np.ndarray, members: np.ndarray, weight: np.ndarray, levels: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """(TPR at each level, AUC) of one replicate with pair weights ``weight``, from per-value weighted counts."""
    finite = np.isfinite(scores)
    values, index = np.unique(scores[finite], return_inverse=True)
    w, m = weight[finite], members[finite]
    pos = np.bincount(index, weights=w * m, minlength=values.size)[::-1]  # highest value first
    neg = np.bincount(index, weights=w * ~m, minlength=values.size)[::-1]
    tp, fp = np.cumsum(pos), np.cumsum(neg)  # called members at threshold = each value, from the top
    n_pos, n_neg = tp[-1], fp[-1]
    tpr = np.array([max([0.0, *(tp[fp <= level * n_neg] / n_pos)]) for level in levels])
    below = n_neg - fp  # non-member weight strictly below each value
    auc = float(np.sum(pos * (below + 0.5 * neg)) / (n_pos * n_neg))
    return tpr, auc


def reference_intervals(scores, members, groups, seed, n_tpr, n_auc, point, auc_point, levels=FPR_LEVELS):
    """Intervals from the first ``n_tpr`` replicates drawn (TPR) and the first ``n_auc`` (AUC), drawn targets first then units.

    A replicate without weighted members or non-members is left out. Returns (tpr, auc, replicates used for each)."""
    rng = np.random.default_rng(seed)
    user_of = np.arange(scores.shape[1]) if groups is None else np.unique(groups, return_inverse=True)[1]
    tprs, aucs = [], []
    for b in range(n_tpr):
        u = rng.poisson(1.0, scores.shape[0]).astype(np.float64)
        v = rng.poisson(1.0, user_of.max() + 1).astype(np.float64)[user_of]
        weight = np.outer(u, v)
        if not weight[members & np.isfinite(scores)].any() or not weight[~members & np.isfinite(scores)].any():
            continue
        tpr, auc = reference_draws(scores, members, weight, levels)
        tprs.append(tpr)
        if b < n_auc:
            aucs.append(auc)
    spread, auc_spread = Z * np.std(tprs, axis=0, ddof=1), Z * np.std(aucs, ddof=1)
    tpr = {str(level): [max(0.0, p - s), min(1.0, p + s)] for level, p, s in zip(levels, point, spread)}
    return tpr, [max(0.0, auc_point - auc_spread), min(1.0, auc_point + auc_spread)], (len(tprs), len(aucs))


def generated(seed: int, ties: bool, missing: bool, n_targets: int = 12, n_samples: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    members = rng.random((n_targets, n_samples)) < 0.5
    scores = rng.normal(size=members.shape) + members * rng.exponential(1.0, n_samples) + rng.normal(0.0, 1.0, n_samples)
    if ties:
        scores = np.round(scores, 1)
    if missing:
        scores[rng.random(scores.shape) < 0.05] = np.nan
    return scores, members


def check_against_reference(scores, members, groups, seed, drawn):
    """evaluate_scores' bootstrap intervals equal the reference's to 1e-9 (``drawn``: replicates drawn for TPR and for the AUC)."""
    result, _ = evaluate_scores(scores, members, bootstrap=drawn[0], seed=seed, groups=groups)
    point = [result["tpr_at_fpr"][str(level)] for level in FPR_LEVELS]
    tpr, auc, used = reference_intervals(scores, members, groups, seed, *drawn, point, result["auc"])
    assert (result["tpr_at_fpr_ci_bootstrap"]["n_replicates"], result["auc_bootstrap_replicates"]) == used
    for level in FPR_LEVELS:
        np.testing.assert_allclose(result["tpr_at_fpr_ci_bootstrap"][str(level)], tpr[str(level)], atol=1e-9, rtol=0)
    np.testing.assert_allclose(result["auc_ci_bootstrap"], auc, atol=1e-9, rtol=0)


@pytest.mark.parametrize("seed,ties,missing,grouped", [(0, False, False, False), (1, True, False, True), (2, False, True, False), (3, True, True, True)])
@pytest.mark.parametrize("work", [10**8, 70_000])
def test_scan_equals_replicate_by_replicate_reference(monkeypatch, seed, ties, missing, grouped, work):
    """Small blocks (tie groups cross them) and, with work 70,000, 30 AUC replicates of 60: the others scan only the prefix."""
    monkeypatch.setattr(metrics_module, "SCAN_CELLS", 97)
    monkeypatch.setattr(metrics_module, "BOOTSTRAP_WORK", work)
    scores, members = generated(seed, ties, missing)
    check_against_reference(scores, members, np.arange(scores.shape[1]) // 3 if grouped else None, seed + 5, (60, 60 if work == 10**8 else 30))


@pytest.mark.parametrize("seed", range(4))
def test_replicates_that_need_more_than_the_prefix_scan_further(monkeypatch, seed):
    """3 targets x 30 samples: a replicate's weights can leave the prefix short of its largest FPR level, and some draw no member."""
    monkeypatch.setattr(metrics_module, "SCAN_CELLS", 8)
    monkeypatch.setattr(metrics_module, "BOOTSTRAP_WORK", 2_600)  # 30 of the 60 replicates measure the AUC
    scores, members = generated(seed, False, False, n_targets=3, n_samples=30)
    check_against_reference(scores, members, None, seed, (60, 30))


@pytest.mark.parametrize("ties", [False, True])
def test_block_size_changes_nothing(monkeypatch, ties):
    """Weights and counts are integers and every sum is exact in float64, so any cut of the order into blocks gives the same
    intervals, AUC and balanced accuracy."""
    scores, members = generated(9, ties, True, n_targets=8, n_samples=200)
    results = []
    for cells, vertices in ((1, 1), (5, 3), (64, 50), (1 << 20, 1 << 20)):
        monkeypatch.setattr(metrics_module, "SCAN_CELLS", cells)
        monkeypatch.setattr(metrics_module, "COUNT_BLOCK", vertices)
        results.append(evaluate_scores(scores, members, bootstrap=20, seed=1)[0])
    assert all(result == results[0] for result in results[1:])


@pytest.mark.parametrize("ties", [False, True])
def test_thread_count_changes_nothing(monkeypatch, ties):
    """Replicates are split over threads (``runtime.numpy_threads``); one thread, three or more than replicates give the same record."""
    monkeypatch.setattr(metrics_module, "SCAN_CELLS", 41)
    scores, members = generated(4, ties, True, n_targets=8, n_samples=200)
    results = []
    for threads in (1, 3, 64):
        monkeypatch.setattr(metrics_module, "numpy_threads", lambda threads=threads: threads)
        results.append(evaluate_scores(scores, members, bootstrap=40, seed=2)[0])
    assert all(result == results[0] for result in results[1:])


@pytest.mark.parametrize("ties", [False, True])
def test_weight_width_changes_nothing(monkeypatch, ties):
    """The scan's weights are int16 when every u * v fits (the usual case) and int32 otherwise; both give the same record."""
    scores, members = generated(6, ties, True, n_targets=8, n_samples=200)
    narrow = evaluate_scores(scores, members, bootstrap=40, seed=3)[0]
    monkeypatch.setattr(metrics_module, "INT16_WEIGHTS_BELOW", 0)  # no product is below 0: int32
    assert evaluate_scores(scores, members, bootstrap=40, seed=3)[0] == narrow
