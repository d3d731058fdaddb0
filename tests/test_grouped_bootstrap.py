"""The bootstrap resamples the unit that is sampled: users (patients, authors) when samples come in groups."""

from __future__ import annotations

import numpy as np
import pytest

from mia_lightning.metrics import evaluate_scores

LEVELS = (0.1, 0.25)
Z = 1.959964


def brute_force_intervals(scores, members, groups, replicates, seed, tpr_point, auc_point):
    """Independent cluster bootstrap: the same Poisson draws, every threshold tried by hand, weighted Mann-Whitney AUC."""
    rng = np.random.default_rng(seed)
    n_targets, _ = scores.shape
    _, user_of = np.unique(groups, return_inverse=True)
    tpr_draws, auc_draws = [], []
    for _ in range(replicates):
        u = rng.poisson(1.0, n_targets).astype(float)
        w = rng.poisson(1.0, user_of.max() + 1).astype(float)
        weight = np.outer(u, w[user_of])
        n_pos, n_neg = weight[members].sum(), weight[~members].sum()
        if n_pos == 0 or n_neg == 0:
            continue
        best = np.zeros(len(LEVELS))
        for t in np.unique(scores):
            flagged = scores >= t
            tpr, fpr = weight[flagged & members].sum() / n_pos, weight[flagged & ~members].sum() / n_neg
            for k, level in enumerate(LEVELS):
                if fpr <= level + 1e-12:
                    best[k] = max(best[k], tpr)
        tpr_draws.append(best)
        s_pos, w_pos = scores[members], weight[members]
        s_neg, w_neg = scores[~members], weight[~members]
        wins = (s_pos[:, None] > s_neg[None, :]) + 0.5 * (s_pos[:, None] == s_neg[None, :])
        auc_draws.append(float(w_pos @ wins @ w_neg) / (n_pos * n_neg))
    tpr_spread = Z * np.std(np.array(tpr_draws), axis=0, ddof=1)
    auc_spread = Z * np.std(auc_draws, ddof=1)
    tpr = {str(level): [max(0.0, p - s), min(1.0, p + s)] for level, p, s in zip(LEVELS, tpr_point, tpr_spread)}
    return tpr, [max(0.0, auc_point - auc_spread), min(1.0, auc_point + auc_spread)]


def _data(seed=0, n_targets=3, n_users=8, per_user=4):
    rng = np.random.default_rng(seed)
    groups = np.repeat(rng.permutation(100)[:n_users], per_user)  # user ids need not be 0..U-1
    members = rng.random((n_targets, groups.size)) < 0.5
    user_effect = rng.normal(0.0, 1.0, n_users)[np.unique(groups, return_inverse=True)[1]]
    scores = np.round(user_effect + members + rng.normal(0.0, 0.7, members.shape), 1)  # rounding makes ties
    return scores, members, groups


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_bootstrap_equals_a_hand_computation(seed):
    scores, members, groups = _data(seed)
    metrics, _ = evaluate_scores(scores, members, fpr_levels=LEVELS, bootstrap=50, seed=7, groups=groups)
    tpr, auc = brute_force_intervals(scores, members, groups, 50, 7, [metrics["tpr_at_fpr"][str(x)] for x in LEVELS], metrics["auc"])
    assert metrics["bootstrap_unit"] == "targets x users"
    for level in LEVELS:
        np.testing.assert_allclose(metrics["tpr_at_fpr_ci_bootstrap"][str(level)], tpr[str(level)], atol=1e-9)
    np.testing.assert_allclose(metrics["auc_ci_bootstrap"], auc, atol=1e-9)


@pytest.mark.parametrize("step", [1, 7])
def test_one_sample_per_user_is_the_sample_bootstrap(step):
    """Draw for draw when the user ids increase with the sample index (any ids: users are numbered in sorted order), as docs/attacks.md says."""
    scores, members, _ = _data(2, per_user=1, n_users=40)
    by_sample, _ = evaluate_scores(scores, members, bootstrap=40, seed=3)
    by_user, _ = evaluate_scores(scores, members, bootstrap=40, seed=3, groups=step * np.arange(scores.shape[1]) + 5)
    assert by_sample["bootstrap_unit"] == "targets x samples"
    assert by_sample["tpr_at_fpr_ci_bootstrap"] == by_user["tpr_at_fpr_ci_bootstrap"]
    assert by_sample["auc_ci_bootstrap"] == by_user["auc_ci_bootstrap"]


def test_correlated_samples_widen_the_interval_only_when_users_are_resampled():
    """Each user's 10 samples repeat one score: resampling samples pretends there are 10x more independent units."""
    rng = np.random.default_rng(5)
    n_users, per_user = 30, 10
    groups = np.repeat(np.arange(n_users), per_user)
    member_users = rng.random((40, n_users)) < 0.5
    user_scores = member_users * 0.8 + rng.normal(0.0, 1.0, n_users)
    scores, members = np.repeat(user_scores, per_user, axis=1), np.repeat(member_users, per_user, axis=1)
    naive, _ = evaluate_scores(scores, members, bootstrap=200, seed=0)
    grouped, _ = evaluate_scores(scores, members, bootstrap=200, seed=0, groups=groups)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(grouped["auc_ci_bootstrap"]) > 2.0 * width(naive["auc_ci_bootstrap"])


def test_groups_of_the_wrong_length_are_refused():
    scores, members, groups = _data(0)
    with pytest.raises(ValueError, match="one user id per sample"):
        evaluate_scores(scores, members, bootstrap=10, groups=groups[:-1])
