"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from mia_lightning.metrics import ascending_order, clopper_pearson, evaluate_scores, membership_metrics
from mia_lightning.metrics import roc_curve as exact_roc_curve


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


def test_matches_torchmetrics_on_scores_in_the_unit_interval():
    """torchmetrics' BinaryROC / BinaryAUROC agree where they apply (scores already in [0, 1], float32-representable)."""
    import torch
    from torchmetrics.classification import BinaryAUROC, BinaryROC

    rng = np.random.default_rng(4)
    members = rng.random(3000) < 0.4
    scores = np.round(rng.beta(2, 2, members.size) * 0.6 + 0.3 * members, 3)  # in [0, 1], with ties
    metrics, _ = evaluate_scores(scores, members)
    target = torch.from_numpy(members.astype(np.int64))
    fpr, tpr, _ = BinaryROC(thresholds=None)(torch.from_numpy(scores), target)
    assert metrics["auc"] == pytest.approx(BinaryAUROC(thresholds=None)(torch.from_numpy(scores), target).item(), abs=1e-6)
    exact = exact_roc_curve(scores, members)
    np.testing.assert_allclose(exact.fpr, fpr.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(exact.tpr, tpr.double().numpy(), atol=1e-6)


def test_resolution_fields_flag_ties_that_swallow_low_fprs():
    members = np.arange(2000) < 1000
    scores = np.where(members, 1.0, 0.0)
    scores[1000:1100] = 1.0  # 10% of non-members tie with every member at the top
    metrics, curve = evaluate_scores(scores, members)
    assert metrics["n_distinct_scores"] == 2 and metrics["min_resolvable_fpr"] == pytest.approx(0.1)
    assert metrics["tpr_at_fpr"]["0.01"] == 0.0 and metrics["auc"] == pytest.approx(0.95)
    assert curve.fpr.size <= 1001 and curve.n_negatives == 1000  # the kept curve is plot-sized


def simulate_pairs(rng, n_targets: int, n_samples: int, sample_effect: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose member boost varies by sample (shared across targets): pairs sharing a sample are correlated."""
    members = rng.random((n_targets, n_samples)) < 0.5
    boost = rng.exponential(sample_effect, n_samples)
    return rng.normal(size=members.shape) + members * boost + rng.normal(0, 1, (1, n_samples)), members


def test_two_way_bootstrap_is_wider_than_clopper_pearson_when_samples_are_shared():
    rng = np.random.default_rng(7)
    scores, members = simulate_pairs(rng, 64, 800, 1.5)
    metrics, _ = evaluate_scores(scores, members, bootstrap=100)
    boot, exact = metrics["tpr_at_fpr_ci_bootstrap"], metrics["tpr_at_fpr_ci"]
    assert boot["n_replicates"] == 100
    for level in ("0.01", "0.1"):
        assert boot[level][1] - boot[level][0] > 1.5 * (exact[level][1] - exact[level][0]), (level, boot[level], exact[level])


def test_two_way_bootstrap_covers_the_population_value():
    """Across independent re-draws of targets and samples, the bootstrap interval covers the population TPR most of the time."""
    population_scores, population_members = simulate_pairs(np.random.default_rng(0), 400, 4000, 1.0)
    truth = evaluate_scores(population_scores, population_members)[0]["tpr_at_fpr"]["0.1"]
    rng = np.random.default_rng(1)
    covered = []
    for _ in range(30):
        rows = rng.choice(400, 16, replace=False)
        cols = rng.choice(4000, 300, replace=False)
        low, high = evaluate_scores(population_scores[np.ix_(rows, cols)], population_members[np.ix_(rows, cols)], bootstrap=60)[0]["tpr_at_fpr_ci_bootstrap"]["0.1"]
        covered.append(low <= truth <= high)
    assert np.mean(covered) >= 0.8, np.mean(covered)  # nominal 95%; Clopper-Pearson over pairs covers far less here


def straightforward_bootstrap_auc(scores: np.ndarray, members: np.ndarray, replicates: int, seed: int) -> list[float]:
    """The two-way Poisson bootstrap of the AUC written out pair by pair: every (member pair, non-member pair) comparison weighted."""
    rng = np.random.default_rng(seed)
    n_targets, n_samples = members.shape
    flat_scores, flat_members = scores.ravel(), members.ravel()
    pos, neg = flat_scores[flat_members], flat_scores[~flat_members]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    draws = []
    for _ in range(replicates):
        u, v = rng.poisson(1.0, n_targets), rng.poisson(1.0, n_samples)
        weights = (u[:, None] * v[None, :]).ravel().astype(np.float64)
        w_pos, w_neg = weights[flat_members], weights[~flat_members]
        if w_pos.sum() == 0 or w_neg.sum() == 0:
            continue
        draws.append(w_pos @ wins @ w_neg / (w_pos.sum() * w_neg.sum()))
    auc = roc_auc_score(flat_members, flat_scores)
    spread = 1.959964 * np.std(draws, ddof=1)
    return [max(0.0, auc - spread), min(1.0, auc + spread)]


@pytest.mark.parametrize("ties", [False, True])
def test_auc_bootstrap_interval_equals_a_straightforward_two_way_bootstrap(ties):
    rng = np.random.default_rng(3)
    scores, members = simulate_pairs(rng, 6, 40, 1.0)
    if ties:
        scores = np.round(scores)  # many tied scores: ties count half in both implementations
    metrics, _ = evaluate_scores(scores, members, bootstrap=50, seed=11)
    expected = straightforward_bootstrap_auc(scores, members, 50, seed=11)
    assert metrics["auc_bootstrap_replicates"] == 50
    assert metrics["auc_ci_bootstrap"] == pytest.approx(expected, abs=1e-6)
    assert metrics["auc_ci_bootstrap"][0] < metrics["auc"] < metrics["auc_ci_bootstrap"][1]


@pytest.mark.parametrize("case", ["continuous", "ties", "signed_zeros_and_inf", "differ_in_the_packed_bits", "single", "empty"])
def test_ascending_order_is_an_exact_argsort(case):
    # the packed-integer sort drops each key's low bits for the pair index; keys that differ only there must still come out sorted
    rng = np.random.default_rng(3)
    keys = {
        "continuous": rng.normal(size=5000),
        "ties": rng.integers(-3, 3, 5000).astype(np.float64),
        "signed_zeros_and_inf": np.array([0.0, -0.0, np.inf, -0.0, 1e-300, -1e-300, 0.0, -np.inf, np.inf]),
        "differ_in_the_packed_bits": 1.0 + rng.integers(0, 50, 5000) * np.finfo(np.float64).eps,
        "single": np.array([2.5]),
        "empty": np.zeros(0),
    }[case]
    order, ranks = ascending_order(keys.copy())  # it consumes its argument
    assert np.array_equal(np.sort(order), np.arange(keys.size))
    assert np.array_equal(keys[order], np.sort(keys))
    assert np.array_equal(ranks[1:] == ranks[:-1], keys[order][1:] == keys[order][:-1])  # equal ranks <=> equal keys (-0.0 == 0.0)


def test_a_bootstrap_without_two_usable_replicates_gives_no_interval_rather_than_zero_to_one():
    """One target with one member: most Poisson replicates drop it; a spread from fewer than 2 usable replicates is undefined."""
    scores = np.array([[0.9, 0.1, 0.2, 0.3]])
    members = np.array([[True, False, False, False]])
    metrics, _ = evaluate_scores(scores, members, bootstrap=2, seed=3)
    assert "tpr_at_fpr_ci_bootstrap" not in metrics and "auc_ci_bootstrap" not in metrics
    metrics, _ = evaluate_scores(scores, members, bootstrap=100)
    assert metrics["tpr_at_fpr_ci_bootstrap"]["n_replicates"] >= 2


@pytest.mark.parametrize("replicates", [1, -5])
def test_a_bootstrap_of_one_or_fewer_replicates_is_refused(replicates):
    from mia_lightning.errors import MiaError
    from mia_lightning.metrics import check_bootstrap

    with pytest.raises(MiaError, match=f"--bootstrap {replicates}: give 0"):
        check_bootstrap(replicates)
