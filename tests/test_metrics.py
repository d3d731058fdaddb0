"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from mia_lightning.metrics import clopper_pearson, membership_metrics


def test_hand_computed_example():
    # members score 4, 3, 1; non-members 2, 0, -1, -2 (ties none)
    scores = np.array([4.0, 3.0, 1.0, 2.0, 0.0, -1.0, -2.0])
    members = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    m = membership_metrics(scores, members, fpr_levels=(0.0, 0.25, 0.5))
    assert m["auc"] == pytest.approx(11 / 12)
    assert m["tpr_at_fpr"] == {"0.0": pytest.approx(2 / 3), "0.25": pytest.approx(1.0), "0.5": pytest.approx(1.0)}
    # best threshold: everything >= 1 -> TPR 1, FPR 1/4 -> 1 - (0.25 + 0) / 2
    assert m["balanced_accuracy"] == pytest.approx(0.875)
    assert (m["n_members"], m["n_nonmembers"]) == (3, 4)


def test_large_scores_are_not_squashed_into_ties():
    # torchmetrics applies a sigmoid to scores outside [0, 1]; LiRA scores of +-1e3 must still rank
    scores = np.array([1000.0, 900.0, 800.0, -800.0])
    members = np.array([1, 1, 0, 0], dtype=bool)
    assert membership_metrics(scores, members)["auc"] == pytest.approx(1.0)


def test_matches_sklearn_and_skips_nan():
    rng = np.random.default_rng(1)
    members = rng.random((5, 400)) < 0.5
    scores = rng.normal(size=members.shape) + 0.7 * members
    scores = np.round(scores, 1)  # ties
    scores[0, :7] = np.nan
    m = membership_metrics(scores, members)
    ok = np.isfinite(scores)
    fpr, tpr, _ = roc_curve(members[ok], scores[ok])
    assert m["auc"] == pytest.approx(roc_auc_score(members[ok], scores[ok]), abs=1e-12)
    for level in ("0.001", "0.01", "0.1"):
        assert m["tpr_at_fpr"][level] == pytest.approx(tpr[fpr <= float(level)].max())
    assert m["balanced_accuracy"] == pytest.approx(np.max(1 - (fpr + 1 - tpr) / 2))
    assert m["n_members"] + m["n_nonmembers"] == ok.sum()


def test_clopper_pearson_known_values():
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(0.30849, abs=1e-5))
    low, high = clopper_pearson(5, 10)
    assert (low, high) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    assert clopper_pearson(10, 10)[1] == 1.0
