"""Empirical epsilon lower bounds (docs/epsilon.md): hand-checked counts, the one-run theorem, known mechanisms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from mia_lightning.errors import MiaError
from mia_lightning.metrics import clopper_pearson
from mia_lightning.privacy.epsilon import (
    GUESS_TOTALS,
    MEMBER_SHARES,
    clopper_pearson_lower,
    independent_runs_epsilon,
    one_run_bound,
    one_run_epsilon,
    one_run_p_value,
)

REPETITIONS = 200
SLACK = int(stats.binom.ppf(0.999, REPETITIONS, 0.05))
"""Exceedances allowed in REPETITIONS runs of a 95% bound: the binomial(200, 0.05) 99.9% quantile (21; mean 10)."""


def randomised_response(bits: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """Each (model, canary) reports its membership bit, flipped with probability 1 / (1 + e^eps): exactly eps-DP."""
    return (bits ^ (rng.random(bits.shape) < 1.0 / (1.0 + math.exp(eps)))).astype(np.float64)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of score = bit + N(0, sigma^2) at ``delta`` (Balle and Wang, "Improving the Gaussian Mechanism for
    Differential Privacy: Analytical Calibration and Optimal Denoising", ICML 2018, Theorem 8):
    delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) with mu = 1/sigma."""
    mu = 1.0 / sigma

    def gap(eps: float) -> float:
        return stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta

    return optimize.brentq(gap, 0.0, 50.0)


def straightforward_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 3.1 of Steinke, Nasr and Jagielski (2023) written out: f(v) + 2 m delta max_{i=1..m} (f(v-i) - f(v)) / i."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x: int) -> float:
        return float(stats.binom.sf(x - 1, r, q))

    return min(1.0, f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, m + 1)))


def one_sided(successes: int, trials: int, level: float) -> float:
    """Clopper-Pearson lower bound at ``level`` from scipy's beta quantile (0 for 0 successes)."""
    return 0.0 if successes == 0 else float(stats.beta.ppf(1 - level, successes, trials - successes + 1))


def test_one_sided_bounds_match_two_sided_interval_at_twice_alpha():
    for k, n in ((0, 10), (3, 10), (10, 10), (7, 250)):
        low, high = clopper_pearson(k, n, confidence=0.90)  # each side of a 90% two-sided interval is a 95% one-sided bound
        assert clopper_pearson_lower(k, n, 0.95) == pytest.approx(low, abs=1e-12)
        assert 1.0 - clopper_pearson_lower(n - k, n, 0.95) == pytest.approx(high, abs=1e-12)


def test_independent_runs_hand_checked():
    # 12 selection models: sample 1 separates members (scores 0.6..1.1) from non-members (0.0..0.5) perfectly,
    # sample 0 does not; sample 2 has no non-member (no test); sample 3 copies sample 1 on the selection models but
    # has fewer evaluation models, so the tie goes to sample 1.
    select_members = np.tile(np.arange(12) < 6, (4, 1)).T
    select_members[:, 2] = True
    select_scores = np.tile(np.r_[np.linspace(0.6, 1.1, 6), np.linspace(0.0, 0.5, 6)], (4, 1)).T
    select_scores[:, 0] = np.random.default_rng(0).permutation(12)
    # 21 evaluation models on sample 1: 10 members (9 above 0.55, 1 below), 10 non-members (all below), 1 unscored
    eval_members = np.zeros((21, 4), dtype=bool)
    eval_members[:10] = True
    eval_scores = np.where(eval_members, 0.9, 0.2)
    eval_scores[0, 1] = 0.3  # a member below the threshold
    eval_scores[20, :] = np.nan
    eval_scores[5:15, 3] = np.nan  # sample 3: fewer evaluation models
    result = independent_runs_epsilon(select_scores, select_members, eval_scores, eval_members, dp_epsilon=2.0)

    side = math.sqrt(0.95)  # both one-sided bounds at sqrt(0.95) hold together with probability 0.95
    a = 1 - side
    perfect = math.log((a ** (1 / 6) - 1e-5) / (1 - a ** (1 / 6)))  # 6/6 members above, 6/6 non-members below
    assert (result["canary"], result["direction"], result["threshold"]) == (1, "members", pytest.approx(0.55))
    assert result["selection_bound"] == pytest.approx(perfect, abs=1e-9)
    assert result["counts"] == {"tp": 9, "fp": 0, "tn": 10, "fn": 1}
    assert result["n_trials"] == 20 and result["n_evaluation_models"] == 21 and result["n_selection_models"] == 12
    expected = math.log((one_sided(9, 10, side) - 1e-5) / (1 - one_sided(10, 10, side)))
    assert expected > 0.3
    assert result["epsilon_lower_bound"] == pytest.approx(expected, abs=1e-9)
    assert result["max_possible"] == pytest.approx(math.log((a ** (1 / 10) - 1e-5) / (1 - a ** (1 / 10))), abs=1e-9)
    assert result["method"] == "independent_runs" and result["theoretical_epsilon"] == 2.0
    assert "Jagielski" in result["citation"] and "sample 1" in result["statement"]
    json.dumps(result, allow_nan=False)


def test_independent_runs_non_member_direction():
    # low scores are certain non-members, high scores are mixed: "non-member iff score < threshold" is the better test
    select_members = np.arange(40) % 2 == 0
    select_scores = np.where(select_members, 1.0, np.where(np.arange(40) % 4 == 1, -1.0, 1.0))
    eval_members = np.arange(60) % 2 == 0
    eval_scores = np.where(eval_members, 1.0, np.where(np.arange(60) % 4 == 1, -1.0, 1.0))
    result = independent_runs_epsilon(select_scores[:, None], select_members[:, None], eval_scores[:, None], eval_members[:, None])
    assert (result["direction"], result["threshold"]) == ("non-members", 0.0)
    tp, fp, tn, fn = 30, 15, 15, 0
    assert result["counts"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    side = math.sqrt(0.95)
    tnr_low, fnr_high = one_sided(tn, tn + fp, side), 1 - one_sided(tp, tp + fn, side)
    assert result["epsilon_lower_bound"] == pytest.approx(math.log((tnr_low - 1e-5) / fnr_high), abs=1e-9)


def test_one_run_p_value_is_the_theorem():
    rng = np.random.default_rng(3)
    cases = [(100, 50, 40, 1.0, 1e-3), (1000, 200, 150, 0.7, 1e-5), (200, 100, 50, 0.2, 1e-3), (50, 10, 10, 3.0, 0.0),
             (2000, 1000, 990, 3.0, 1e-4), (3000, 1500, 1490, 2.5, 1e-5)]  # the last two: f(v) underflows at the peak
    for _ in range(20):
        m = int(rng.integers(10, 400))
        r = int(rng.integers(1, m + 1))
        cases.append((m, r, int(rng.integers(0, r + 1)), float(rng.uniform(0, 4)), float(rng.choice([0.0, 1e-5, 1e-3]))))
    for m, r, v, eps, delta in cases:
        assert one_run_p_value(r, v, m, eps, delta) == pytest.approx(straightforward_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)
    # 2 m delta > 1: the windows i < 2 m delta use a larger, monotone term, never a smaller p-value
    for m, r, v, eps in ((60, 60, 55, 2.0), (30, 20, 19, 1.5), (400, 300, 280, 1.2)):
        assert one_run_p_value(r, v, m, eps, 0.05) >= straightforward_p_value(m, r, v, eps, 0.05) - 1e-12
    grid = np.linspace(0, 5, 200)
    assert np.all(np.diff(one_run_p_value(300, 280, 400, grid, 0.05)) >= -1e-15)  # monotone in eps, also when 2 m delta > 1


def test_one_run_bound_is_where_the_p_value_crosses_the_level():
    r, v, m = np.array([1000, 500, 20000]), np.array([800, 490, 19990]), np.array([2000, 1000, 25000])
    bound = one_run_bound(r, v, m, 1e-5, 0.95)
    assert np.all(one_run_p_value(r, v, m, bound, 1e-5) < 0.05)
    assert np.all(one_run_p_value(r, v, m, bound + 1e-6, 1e-5) >= 0.05)
    # delta = 0: the logit of the one-sided Clopper-Pearson lower bound on the accuracy v / r
    no_delta = one_run_bound(r, v, m, 0.0, 0.95)
    expected = [math.log(q / (1 - q)) for q in (one_sided(800, 1000, 0.95), one_sided(490, 500, 0.95), one_sided(19990, 20000, 0.95))]
    assert no_delta == pytest.approx(expected, abs=1e-7)
    assert np.all(bound <= no_delta)
    assert one_run_bound(100, 50, 200, 1e-5, 0.95) == 0.0  # chance accuracy


def test_one_run_functions_take_empty_inputs():
    """Vectorised over their arguments, so an empty batch gives an empty answer of the broadcast shape."""
    assert one_run_p_value([], [], [], [], 1e-5).shape == (0,)
    assert one_run_bound(np.zeros((0, 3), dtype=np.int64), 0, 10, 1e-5, 0.95).shape == (0, 3)


def test_one_run_test_has_its_level_on_binomial_counts():
    # guesses on randomised-response canaries are each right with probability e^eps / (1 + e^eps), independently:
    # the test must reject the true eps at most 5% of the time, and nearly 5% of the time (it is exact here)
    rng = np.random.default_rng(8)
    eps, r = 1.0, 1000
    correct = rng.binomial(r, math.exp(eps) / (1 + math.exp(eps)), size=4000)
    values, inverse = np.unique(correct, return_inverse=True)
    rate = float(np.mean(one_run_bound(r, values, r, 0.0, 0.95)[inverse] > eps))
    assert 0.035 <= rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)
    with_delta = float(np.mean(one_run_bound(r, values, 2 * r, 1e-5, 0.95)[inverse] > eps))
    assert with_delta <= rate


def test_one_run_hand_checked():
    n, seed = 200, 7
    permutation = np.random.default_rng(seed).permutation(n)  # the documented seeded split
    select, evaluate = permutation[: n // 2], permutation[n // 2:]
    members = np.zeros(n, dtype=bool)
    members[select[:50]] = members[evaluate[:50]] = True  # 50 members and 50 non-members in each half
    scores = np.where(members, 1.0 + np.arange(n) / 100, -1.0 - np.arange(n) / 100)[None, :]
    scores[0, evaluate[50:55]] = 5.0  # five evaluation non-members score above every member
    result = one_run_epsilon(scores, members[None, :], seed=seed)
    # the selection half separates perfectly: every share of floor(100 / 2) = 50 guesses is all-correct there and the
    # first maximum wins (share 0). On the evaluation half the 50 lowest scores are called non-members:
    # the 45 non-members left low, then the 5 lowest-scoring members
    assert (result["guess_fraction"], result["member_share"]) == (GUESS_TOTALS[0], MEMBER_SHARES[0])
    lowest = evaluate[np.argsort(scores[0, evaluate])[:50]]
    assert int(np.sum(~members[lowest])) == 45
    assert result["counts"] == {"guesses": 50, "correct": 45, "canaries": 100, "targets": 1}
    # candidate totals: floor(g * 100) = 50, 12, 3, 0, 0 guesses; only 50 and 12 all-correct guesses beat the level 0.05 / 5
    assert result["guess_totals"] == [GUESS_TOTALS[0], GUESS_TOTALS[1]]
    alpha = 0.05 / 2

    def straightforward_bound(correct: int) -> float:
        low, high = 0.0, 20.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if straightforward_p_value(100, 50, correct, middle, 1e-5) < alpha else (low, middle)
        return low

    assert straightforward_bound(45) > 1.0
    assert result["epsilon_lower_bound"] == pytest.approx(straightforward_bound(45), abs=1e-6)
    assert result["max_possible"] == pytest.approx(straightforward_bound(50), abs=1e-6)
    assert (result["per_target"][0]["k_plus"], result["per_target"][0]["k_minus"], result["n_trials"]) == (0, 50, 50)
    assert "Steinke" in result["citation"] and "45 of 50" in result["statement"]
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_randomised_response_bounds_hold_at_their_confidence(eps):
    runs_over = one_run_over = 0
    for repetition in range(REPETITIONS):
        rng = np.random.default_rng([int(eps * 10), repetition])
        select, evaluate = rng.random((80, 10)) < 0.5, rng.random((80, 10)) < 0.5
        runs = independent_runs_epsilon(randomised_response(select, eps, rng), select, randomised_response(evaluate, eps, rng), evaluate)
        runs_over += runs["epsilon_lower_bound"] > eps
        bits = rng.random((2, 1000)) < 0.5
        one_run_over += one_run_epsilon(randomised_response(bits, eps, rng), bits, seed=repetition)["epsilon_lower_bound"] > eps
    assert runs_over <= SLACK and one_run_over <= SLACK


def test_one_run_without_delta_is_exact_on_randomised_response():
    # delta = 0 leaves only the binomial tail, which randomised response meets with equality per guess
    eps, over = 1.0, 0
    for repetition in range(REPETITIONS):
        rng = np.random.default_rng([99, repetition])
        bits = rng.random((1, 2000)) < 0.5
        over += one_run_epsilon(randomised_response(bits, eps, rng), bits, delta=0.0, seed=repetition)["epsilon_lower_bound"] > eps
    assert over <= SLACK


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_many_trials_come_close_to_randomised_response_epsilon(eps):
    rng = np.random.default_rng(int(eps * 100))
    select, evaluate = rng.random((3000, 3)) < 0.5, rng.random((3000, 3)) < 0.5
    runs = independent_runs_epsilon(randomised_response(select, eps, rng), select, randomised_response(evaluate, eps, rng), evaluate)
    bits = rng.random((4, 20000)) < 0.5
    one_run = one_run_epsilon(randomised_response(bits, eps, rng), bits)
    for result in (runs, one_run):
        assert 0.6 * eps <= result["epsilon_lower_bound"] <= eps


def test_gaussian_mechanism():
    sigma = 1.0
    rng = np.random.default_rng(11)
    # independent runs at delta = 0.1: the best threshold test sits where thousands of runs resolve it
    true_eps = gaussian_epsilon(sigma, 0.1)
    assert true_eps == pytest.approx(1.160, abs=1e-3)  # Phi(-0.66) - e^1.16 Phi(-1.66) = 0.2546 - 0.1546
    over = 0
    for repetition in range(REPETITIONS):
        select, evaluate = rng.random((80, 10)) < 0.5, rng.random((80, 10)) < 0.5
        result = independent_runs_epsilon(select + rng.normal(0, sigma, select.shape), select,
                                          evaluate + rng.normal(0, sigma, evaluate.shape), evaluate, delta=0.1)
        over += result["epsilon_lower_bound"] > true_eps
    assert over <= SLACK
    select, evaluate = rng.random((3000, 3)) < 0.5, rng.random((3000, 3)) < 0.5
    many = independent_runs_epsilon(select + rng.normal(0, sigma, select.shape), select,
                                    evaluate + rng.normal(0, sigma, evaluate.shape), evaluate, delta=0.1)
    assert 0.6 * true_eps <= many["epsilon_lower_bound"] <= true_eps
    # one run at delta = 1e-5 (the 2 m delta term needs a small delta; eps(1e-5) = 4.38 lives in the far tail):
    # measured 2.23, about half of it
    true_eps = gaussian_epsilon(sigma, 1e-5)
    bits = rng.random((4, 20000)) < 0.5
    one_run = one_run_epsilon(bits + rng.normal(0, sigma, bits.shape), bits)
    assert 0.4 * true_eps <= one_run["epsilon_lower_bound"] <= true_eps


def test_random_scores_give_no_bound():
    rng = np.random.default_rng(1)
    members = rng.random((64, 2000)) < 0.5
    scores = rng.normal(size=members.shape)
    assert independent_runs_epsilon(scores[:32], members[:32], scores[32:], members[32:])["epsilon_lower_bound"] < 0.1
    assert one_run_epsilon(scores, members)["epsilon_lower_bound"] < 0.1


def test_unscored_pairs_are_dropped():
    rng = np.random.default_rng(5)
    select, evaluate = rng.random((60, 30)) < 0.5, rng.random((60, 30)) < 0.5
    select_scores, eval_scores = randomised_response(select, 2.0, rng), randomised_response(evaluate, 2.0, rng)
    eval_scores[::3] = np.nan
    result = independent_runs_epsilon(select_scores, select, eval_scores, evaluate)
    assert result["n_trials"] == 40  # 60 evaluation models, 20 unscored
    flipped = evaluate.copy()
    flipped[::3] = ~flipped[::3]  # membership of unscored pairs is never read
    assert independent_runs_epsilon(select_scores, select, eval_scores, flipped) == result

    bits = rng.random((3, 4000)) < 0.5
    scores = randomised_response(bits, 2.0, rng)
    scores[:, ::4] = np.nan
    result = one_run_epsilon(scores, bits)
    flipped = bits.copy()
    flipped[:, ::4] = ~flipped[:, ::4]
    assert one_run_epsilon(scores, flipped) == result
    assert result["counts"]["guesses"] <= 3 * 1500 and result["counts"]["canaries"] == 3 * 2000


def test_infinite_scores_keep_their_order():
    rng = np.random.default_rng(6)
    bits = rng.random((2, 2000)) < 0.5
    scores = randomised_response(bits, 1.5, rng) + rng.normal(0, 0.1, bits.shape)
    scores[:, :50] = np.where(bits[:, :50], np.inf, -np.inf)
    scores[:, 50:60] = np.nan
    finite = np.where(np.isposinf(scores), 1e300, np.where(np.isneginf(scores), -1e300, scores))
    assert one_run_epsilon(scores, bits)["counts"] == one_run_epsilon(finite, bits)["counts"]
    runs, runs_finite = (independent_runs_epsilon(x[:1].T.repeat(2, axis=1), bits[:1].T.repeat(2, axis=1),
                                                  x[1:].T.repeat(2, axis=1), bits[1:].T.repeat(2, axis=1)) for x in (scores, finite))
    assert runs["counts"] == runs_finite["counts"] and runs["epsilon_lower_bound"] == runs_finite["epsilon_lower_bound"]


def test_degenerate_inputs():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(8, 20))
    members = rng.random((8, 20)) < 0.5
    no_members = independent_runs_epsilon(scores[:4], members[:4], scores[4:], np.zeros((4, 20), dtype=bool))
    assert no_members["epsilon_lower_bound"] == 0.0 and "non-member" in no_members["reason"]
    one_model = independent_runs_epsilon(scores[:1], members[:1], scores[4:], members[4:])
    assert one_model["epsilon_lower_bound"] == 0.0 and "2 models" in one_model["reason"]
    assert one_run_epsilon(np.full((2, 3), np.nan), members[:2, :3])["reason"]
    with pytest.raises(MiaError, match="coin flips"):
        one_run_epsilon(rng.normal(size=(2, 500)), np.zeros((2, 500), dtype=bool))
    with pytest.raises(MiaError, match="one \\[models, samples\\] shape"):
        independent_runs_epsilon(scores[:4], members[:3], scores[4:], members[4:])
    with pytest.raises(MiaError, match="samples differ"):
        independent_runs_epsilon(scores[:4, :10], members[:4, :10], scores[4:], members[4:])
    with pytest.raises(MiaError, match="confidence"):
        one_run_epsilon(scores, members, confidence=1.0)
    with pytest.raises(MiaError, match="delta"):
        independent_runs_epsilon(scores[:4], members[:4], scores[4:], members[4:], delta=-1e-5)


@pytest.mark.parametrize("ties", [False, True])
def test_blocks_of_samples_change_no_bound(monkeypatch, ties):
    """The test selection runs block by block over samples; any block size gives the same result (NaN scores, ties, both directions)."""
    import mia_lightning.privacy.epsilon as epsilon_module

    rng = np.random.default_rng(4)
    members = rng.random((40, 300)) < 0.5
    scores = rng.normal(size=members.shape) + np.where(rng.random(300) < 0.5, 6.0, -6.0) * members
    scores = np.round(scores, 1) if ties else scores
    scores[rng.random(scores.shape) < 0.05] = np.nan
    results = []
    for elements in (1, 100, 1 << 18):
        monkeypatch.setattr(epsilon_module, "TESTS_BLOCK_ELEMENTS", elements)
        results.append(independent_runs_epsilon(scores[:20], members[:20], scores[20:], members[20:]))
    assert results[0]["epsilon_lower_bound"] > 0
    assert all(result == results[0] for result in results[1:])
