"""User-level aggregation and population thresholds against loop implementations of their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from mia_lightning.errors import MiaError
from mia_lightning.grouping import REDUCTIONS, population_thresholds, precision_recall_at_fpr, user_level


def grouped_case(seed: int = 0, n_targets: int = 3, n_users: int = 9):
    """Scores [T, n] with NaN holes, user ids in shuffled order (some users with one sample), user-constant membership."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_users)
    groups = rng.permutation(np.repeat(rng.choice(1000, n_users, replace=False), sizes))
    users = np.unique(groups)
    user_member = rng.random((n_targets, users.size)) < 0.5
    members = user_member[:, np.searchsorted(users, groups)]
    scores = rng.normal(size=(n_targets, groups.size))
    scores[rng.random(scores.shape) < 0.15] = np.nan
    return scores, members, groups


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_user_level_matches_a_loop(reduce):
    scores, members, groups = grouped_case()
    user_scores, user_members, user_ids = user_level(scores, members, groups, reduce=reduce)
    np.testing.assert_array_equal(user_ids, np.unique(groups))
    reducer = {"mean": np.mean, "median": np.median, "max": np.max, "min": np.min}[reduce]
    for t in range(scores.shape[0]):
        for k, user in enumerate(user_ids):
            values = [scores[t, j] for j in range(groups.size) if groups[j] == user and np.isfinite(scores[t, j])]
            expected = reducer(values) if values else np.nan
            np.testing.assert_allclose(user_scores[t, k], expected, rtol=1e-12, equal_nan=True)
            assert user_members[t, k] == members[t, groups == user][0]


def test_user_mean_by_hand():
    scores = np.array([[1.0, 3.0, np.nan, 10.0], [0.0, 2.0, 5.0, np.nan]])
    members = np.array([[True, True, False, False], [False, False, True, True]])
    groups = np.array([7, 7, 2, 2])
    user_scores, user_members, ids = user_level(scores, members, groups)
    np.testing.assert_array_equal(ids, [2, 7])
    np.testing.assert_array_equal(user_scores, [[10.0, 2.0], [5.0, 1.0]])
    np.testing.assert_array_equal(user_members, [[False, True], [True, False]])


def test_user_without_any_score_is_nan():
    scores = np.array([[np.nan, np.nan, 1.0]])
    user_scores, _, _ = user_level(scores, np.array([[True, True, False]]), np.array([0, 0, 1]))
    assert np.isnan(user_scores[0, 0]) and user_scores[0, 1] == 1.0


def test_mixed_membership_within_a_user_is_refused_in_one_line():
    members = np.array([[True, False, False]])
    with pytest.raises(MiaError) as err:
        user_level(np.zeros((1, 3)), members, np.array([4, 4, 5]), targets=np.array([12]))
    message = str(err.value)
    assert "\n" not in message and "user 4" in message and "target model 12" in message and "user_grouped" in message


@pytest.mark.parametrize(
    "scores, members, groups, reduce, fragment",
    [
        (np.zeros((2, 3)), np.zeros((2, 4), bool), np.arange(3), "mean", "must both be"),
        (np.zeros((2, 3)), np.zeros((2, 3), bool), np.arange(4), "mean", "groups.npy"),
        (np.zeros((2, 3)), np.zeros((2, 3), bool), np.array([0.5, 1, 2]), "mean", "groups.npy"),
        (np.zeros((2, 3)), np.zeros((2, 3), bool), np.arange(3), "mode", "reduce"),
    ],
)
def test_bad_shapes_and_options(scores, members, groups, reduce, fragment):
    with pytest.raises(MiaError, match=fragment):
        user_level(scores, members, groups, reduce=reduce)


def test_budget_threshold_holds_the_budget_exactly_with_ties():
    rng = np.random.default_rng(1)
    population = np.round(rng.normal(size=(4, 137)), 1)  # many ties
    for fpr in (0.0, 0.01, 0.1, 0.5):
        thresholds = population_thresholds(population, fpr)
        flagged = (population > thresholds[:, None]).sum(axis=1)
        assert (flagged <= np.floor(fpr * 137)).all()
        # the lowest such threshold: one step lower (the next smaller population value) would exceed the budget
        for row, threshold in enumerate(thresholds):
            below = population[row][population[row] < threshold]
            if below.size:
                assert (population[row] > below.max()).sum() > np.floor(fpr * 137)


def test_paper_rule_is_the_papers_index():
    """Mireshghallah et al. sort the loss differences descending and take index int(0.9 p) + 1; member iff diff < threshold."""
    rng = np.random.default_rng(2)
    diff = rng.normal(size=2424)  # lower = member, as in the paper's scripts
    paper_threshold = sorted(diff.tolist(), reverse=True)[int(len(diff) * 0.9) + 1]
    ours = population_thresholds(-diff[None, :], 0.1, rule="paper")[0]
    assert ours == -paper_threshold
    test = rng.normal(size=500)
    assert ((-test) > ours).sum() == sum(1 for value in test if value < paper_threshold)


@pytest.mark.parametrize(("p", "flagged"), [(30, 1), (100, 8), (2424, 241)])
def test_paper_rule_flags_two_fewer_than_the_budget(p, flagged):
    """Its threshold is the score at 0-based ascending position int(0.9 p) + 1, so p - int(0.9 p) - 2 distinct scores lie above it
    (one of 30 population users, as docs/mlm.md reports), not the budget's 0.1 p."""
    population = np.random.default_rng(p).permutation(p).astype(np.float64)[None, :]
    threshold = population_thresholds(population, 0.1, rule="paper")[0]
    assert (population > threshold).sum() == flagged == p - int(0.9 * p) - 2


def test_precision_recall_by_hand():
    population = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    scores = np.array([[9.5, 8.5, 7.0, 9.2, np.nan, 3.0]])
    members = np.array([[True, True, True, False, True, False]])
    result = precision_recall_at_fpr(scores, members, population, fpr=0.2)  # flag > 7.0: at most 2 of 10
    assert result["thresholds"] == [7.0]
    assert result["population_fpr"] == 0.2
    assert result["n_flagged"] == 3  # 9.5, 8.5, 9.2 (7.0 is not above)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)  # members 9.5, 8.5, 7.0 (the NaN one is unscored)
    assert result["fpr"] == pytest.approx(1 / 2)


def test_precision_is_none_when_nothing_is_flagged():
    result = precision_recall_at_fpr(np.array([[0.1, 0.2]]), np.array([[True, False]]), np.array([[1.0, 2.0, 3.0]]), fpr=0.0)
    assert result["n_flagged"] == 0 and result["precision"] is None and result["recall"] == 0.0


def test_threshold_errors():
    with pytest.raises(MiaError, match="FPR budget"):
        population_thresholds(np.zeros((1, 3)), 1.0)
    with pytest.raises(MiaError, match="rule"):
        population_thresholds(np.zeros((1, 3)), 0.1, rule="median")
    with pytest.raises(MiaError, match="no finite population"):
        population_thresholds(np.full((1, 3), np.nan), 0.1)
    with pytest.raises(MiaError, match="must be"):
        precision_recall_at_fpr(np.zeros((2, 3)), np.zeros((2, 3), bool), np.zeros((1, 5)))
