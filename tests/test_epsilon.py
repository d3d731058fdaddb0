"""Empirical epsilon lower bound (DESIGN.md "Empirical epsilon")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mia_lightning.metrics import clopper_pearson
from mia_lightning.privacy.epsilon import clopper_pearson_lower, empirical_epsilon, epsilon_bound


def test_one_sided_bounds_match_two_sided_interval_at_twice_alpha():
    for k, n in ((0, 10), (3, 10), (10, 10), (7, 250)):
        low, high = clopper_pearson(k, n, confidence=0.90)  # each side of a 90% two-sided interval is a 95% one-sided bound
        assert clopper_pearson_lower(np.array(k), n, 0.95) == pytest.approx(low, abs=1e-12)
        assert 1.0 - clopper_pearson_lower(np.array(n - k), n, 0.95) == pytest.approx(high, abs=1e-12)


def test_hand_checked_counts_and_bound():
    # 20 members scoring 1 except pairs 0 and 1; 20 non-members scoring 0 except pair 20
    members = np.arange(40) < 20
    scores = members.astype(float)
    scores[[0, 1]], scores[20] = 0.0, 1.0
    evaluation = set(np.random.default_rng(7).permutation(40)[20:].tolist())  # the documented seeded split
    result = empirical_epsilon(scores, members, seed=7)
    assert result["threshold"] == 1.0
    tp = len(evaluation & set(range(2, 20)))
    fn = len(evaluation & {0, 1})
    fp = len(evaluation & {20})
    tn = len(evaluation & set(range(21, 40)))
    assert result["counts"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert (tp, fp, tn, fn) == (9, 0, 10, 1)  # read off the permutation once by hand
    tpr_low = clopper_pearson(tp, tp + fn, 0.90)[0]
    fpr_high = clopper_pearson(fp, fp + tn, 0.90)[1]
    tnr_low = clopper_pearson(tn, tn + fp, 0.90)[0]
    fnr_high = clopper_pearson(fn, fn + tp, 0.90)[1]
    expected = max(math.log((tpr_low - 1e-5) / fpr_high), math.log((tnr_low - 1e-5) / fnr_high), 0.0)
    assert result["epsilon_lower_bound"] == pytest.approx(expected, abs=1e-9)
    assert (result["delta"], result["confidence"], result["seed"]) == (1e-5, 0.95, 7)
    assert "theoretical_epsilon" not in result


def test_perfect_separator_gives_clearly_positive_bound():
    rng = np.random.default_rng(0)
    members = rng.random((4, 500)) < 0.5
    scores = np.where(members, rng.uniform(1, 2, members.shape), rng.uniform(-2, -1, members.shape))
    scores[0, :5] = np.nan  # dropped
    result = empirical_epsilon(scores, members, dp_epsilon=8.0)
    assert result["epsilon_lower_bound"] > 4.0
    assert result["counts"]["fp"] == 0  # the threshold is A's lowest member score: a few members of B fall below it
    assert sum(result["counts"].values()) == (4 * 500 - 5) - (4 * 500 - 5) // 2
    assert result["theoretical_epsilon"] == 8.0


def test_random_scores_give_no_bound():
    rng = np.random.default_rng(1)
    members = rng.random(20000) < 0.5
    assert empirical_epsilon(rng.normal(size=members.size), members)["epsilon_lower_bound"] < 0.1


def test_no_positive_bound_is_zero():
    assert epsilon_bound(np.array([0, 5]), np.array([5, 0]), 5, 5, 1e-5, 0.95).tolist() == [0.0, 0.0]
