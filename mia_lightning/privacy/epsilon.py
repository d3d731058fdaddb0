"""Empirical epsilon: statistical lower bounds on the epsilon of any (epsilon, delta)-DP guarantee of training.

A lower bound must hold at its stated confidence, so the trials behind it must be independent.
Two constructions (definitions, assumptions and worked numbers: docs/epsilon.md):

- ``independent_runs_epsilon``: one membership test (a canary sample, a score threshold and a
  direction) is chosen on selection models and evaluated once on each of the evaluation models,
  which are separate training runs; conditional on the canary's membership bits their outcomes are
  independent Bernoulli trials and one-sided Clopper-Pearson bounds on TPR / FPR (or TNR / FNR)
  bound epsilon through TPR <= e^eps FPR + delta (Kairouz, Oh and Viswanath, "The Composition
  Theorem for Differential Privacy", ICML 2015). Jagielski, Ullman and Oprea, "Auditing
  Differentially Private Machine Learning: How Private is Private SGD?", NeurIPS 2020; Nasr, Song,
  Thakurta, Papernot and Carlini, "Adversary Instantiation: Lower Bounds for Differentially Private
  Machine Learning", IEEE S&P 2021. The bound is capped by the number of evaluation models.
- ``one_run_epsilon``: many canaries in one training run, each included by an independent fair
  coin flip; the auditor guesses on its most confident canaries, and the number of correct guesses
  is dominated by a binomial plus a delta term (Steinke, Nasr and Jagielski, "Privacy Auditing with
  One (1) Training Run", NeurIPS 2023, Theorem 3.1; see ``one_run_p_value``).

Everything is vectorised: the expensive quantities (beta quantiles, binomial tails) are evaluated
on small candidate sets or in lockstep root searches, never once per threshold in a Python loop.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from scipy import special

from mia_lightning.errors import MiaError
from mia_lightning.runtime import numpy_parallel_map

INDEPENDENT_RUNS_CITATION = (
    "Jagielski, Ullman and Oprea, 'Auditing Differentially Private Machine Learning: How Private is Private SGD?', "
    "NeurIPS 2020; Nasr, Song, Thakurta, Papernot and Carlini, 'Adversary Instantiation: Lower Bounds for "
    "Differentially Private Machine Learning', IEEE S&P 2021"
)
ONE_RUN_CITATION = "Steinke, Nasr and Jagielski, 'Privacy Auditing with One (1) Training Run', NeurIPS 2023 (arXiv:2305.08846), Theorem 3.1"

INDEPENDENT_RUNS_ASSUMPTIONS = (
    "The evaluation models are independent training runs of one procedure whose scores depend only on themselves and on "
    "the selection models. The bound is for add/remove neighbours when the other samples' memberships are independent of "
    "the canary's (plan.kind bernoulli); when every training set has the same size (lira_half) the trials compare "
    "replace-one neighbours, so it bounds the replace-one epsilon (an add/remove (eps, delta) guarantee gives replace-one "
    "(2 eps, (1 + e^eps) delta)), up to the weak coupling between models that balancing adds."
)
ONE_RUN_ASSUMPTIONS = (
    "Every (target, canary) membership is an independent fair coin flip (plan.kind bernoulli), each target is trained "
    "independently, and which pairs are scored was fixed by the plan; the bound is for add/remove neighbours."
)

GUESS_TOTALS = (2.0 ** -1, 2.0 ** -3, 2.0 ** -5, 2.0 ** -7, 2.0 ** -9)
"""One-run audit: candidate fractions of the scored canaries to guess on (the test is Bonferroni-corrected over them)."""
MEMBER_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
"""One-run audit: candidate shares of the guesses that call the highest scores members (the rest: lowest, non-members)."""
COIN_FLIP_REJECTION = 1e-9
"""Two-sided binomial p-value below which a target's member count rules out fair coin flips."""
BRACKET_WIDTH = 1e-8
"""One-run bound: the search for the end of the rejected eps interval stops at a bracket this wide (its lower end is returned)."""


def _check_levels(delta: float, confidence: float) -> None:
    """A one-line MiaError unless 0 <= delta < 1 and 0 < confidence < 1."""
    if not 0.0 <= delta < 1.0:
        raise MiaError(f"empirical epsilon: delta {delta!r} must be in [0, 1)")
    if not 0.0 < confidence < 1.0:
        raise MiaError(f"empirical epsilon: confidence {confidence!r} must be in (0, 1), e.g. 0.95")


def _check_matrix(scores: Any, members: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and bool members of one [models, samples] shape, or a one-line MiaError."""
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members)
    if scores.ndim != 2 or members.shape != scores.shape:
        raise MiaError(f"empirical epsilon: {name} scores {scores.shape} and members {members.shape} must be one [models, samples] shape")
    if members.dtype != bool:
        if not np.isin(members, (0, 1)).all():
            raise MiaError(f"empirical epsilon: {name} members must be bool (or 0/1)")
        members = members.astype(bool)
    return scores, members


def _with_theory(result: dict[str, Any], dp_epsilon: float | None) -> dict[str, Any]:
    """Store the DP accountant's epsilon beside the empirical bound, when the models were trained with DP."""
    if dp_epsilon is not None:
        result["theoretical_epsilon"] = float(dp_epsilon)
    return result


def _no_bound(result: dict[str, Any], reason: str, dp_epsilon: float | None) -> dict[str, Any]:
    """The result for data that carries no evidence: bound 0 (trivially valid) and why."""
    result.update({"reason": reason, "statement": f"No bound: {reason}."})
    return _with_theory(result, dp_epsilon)


def clopper_pearson_lower(successes: Any, trials: Any, confidence: float) -> np.ndarray:
    """One-sided exact binomial lower bound on a success rate, holding with probability ``confidence``.

    Vectorised over ``successes`` and ``trials`` (broadcast); 0 successes or 0 trials give 0. The
    matching upper bound is 1 - lower(trials - successes, trials).
    """
    successes = np.asarray(successes, dtype=np.float64)
    trials = np.asarray(trials, dtype=np.float64)
    positive = (successes > 0) & (trials > 0)
    a = np.where(positive, successes, 1.0)
    b = np.where(positive, trials - successes + 1.0, 1.0)
    return np.where(positive, special.betaincinv(a, b, 1.0 - confidence), 0.0)


def _clopper_pearson_table(max_trials: int, trials: np.ndarray, confidence: float) -> np.ndarray:
    """table[s, n] = clopper_pearson_lower(s, n) for s <= n <= max_trials, filled only in the columns n in ``trials``."""
    table = np.zeros((max_trials + 1, max_trials + 1))
    s, n = np.arange(max_trials + 1)[:, None], np.unique(trials)[None, :]
    table[:, n[0]] = np.where(s <= n, clopper_pearson_lower(np.minimum(s, n), n, confidence), 0.0)
    return table


def _rate_bound(true_low: np.ndarray, false_high: np.ndarray, delta: float) -> np.ndarray:
    """log((rate_low - delta) / other_rate_high), -inf where the numerator is not positive."""
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(true_low - delta, 0.0)) - np.log(false_high)


def _cap(n_true: np.ndarray, n_false: np.ndarray, delta: float, side: float) -> np.ndarray:
    """The largest bound n_true / n_false trials can give: every trial on the right side (CP lower of n/n is a^(1/n))."""
    a = 1.0 - side
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(n_true > 0, a ** (1.0 / np.maximum(n_true, 1)), 0.0)
        high = np.where(n_false > 0, 1.0 - a ** (1.0 / np.maximum(n_false, 1)), 1.0)
    return _rate_bound(low, high, delta)


def _descending_order(scores: np.ndarray, kind: str | None = None) -> np.ndarray:
    """Per-row argsort from the highest score down, NaN last (as +inf keys: numpy sorts NaN far more slowly)."""
    big = np.finfo(np.float64).max
    return np.argsort(np.where(np.isnan(scores), np.inf, np.clip(-scores, -big, big)), axis=1, kind=kind)


TESTS_BLOCK_ELEMENTS = 1 << 18
"""Scores per block of samples in ``_best_tests`` (its dozen temporaries stay in cache instead of one [n, k] array each)."""


def _best_tests(scores: np.ndarray, members: np.ndarray, delta: float, side: float) -> dict[str, np.ndarray]:
    """Per sample, the threshold test with the largest bound on these models ([k, n] inputs, NaN = no score).

    Sorts each sample's k scores once and reads every cut between distinct scores from cumulative
    counts; the Clopper-Pearson bounds come from one table over counts <= k and the two directions
    are compared as ratios (log is monotone), so the cost is about that of the sort. Samples are
    independent, so they are taken in blocks, a block per thread at a time.
    Returns per-sample "bound", "threshold" (member iff score >= threshold) and "members_found"
    (True: TPR vs FPR; False: TNR vs FNR).
    """
    k, n = scores.shape
    scored = ~np.isnan(scores)
    n_pos = np.count_nonzero(scored & members, axis=0)
    table = _clopper_pearson_table(k, np.concatenate([n_pos, np.count_nonzero(scored, axis=0) - n_pos]), side).ravel()
    step = max(1, TESTS_BLOCK_ELEMENTS // max(k, 1))
    blocks = numpy_parallel_map(lambda start: _best_tests_block(scores[:, start:start + step], members[:, start:start + step], table, delta),
                                range(0, max(n, 1), step))
    return {key: np.concatenate([block[key] for block in blocks]) for key in ("bound", "threshold", "members_found")}


def _best_tests_block(scores: np.ndarray, members: np.ndarray, table: np.ndarray, delta: float) -> dict[str, np.ndarray]:
    """``_best_tests`` on one block of samples, with the Clopper-Pearson lower bounds ``table`` (flat [(k + 1) x (k + 1)])."""
    k = scores.shape[0]
    by_sample = np.ascontiguousarray(scores.T)
    order = _descending_order(by_sample, kind="stable")
    ranked = np.take_along_axis(by_sample, order, axis=1)
    n_scored = np.count_nonzero(~np.isnan(ranked), axis=1)[:, None]
    position = np.arange(1, k)
    is_member = np.take_along_axis(np.ascontiguousarray(members.T), order, axis=1) & (np.arange(k) < n_scored)
    tp = np.cumsum(is_member, axis=1, dtype=np.int64)
    n_pos = tp[:, -1:]
    n_neg = n_scored - n_pos
    tp = tp[:, :-1]  # cut after ranked position p - 1: the p highest are called members
    tn = n_neg - (position - tp)
    cut = (position < n_scored) & (ranked[:, :-1] != ranked[:, 1:]) & (n_pos > 0) & (n_neg > 0)
    tpr_low = table[tp * (k + 1) + n_pos]
    tnr_low = table[np.maximum(tn, 0) * (k + 1) + n_neg]
    members_found = np.maximum(tpr_low - delta, 0.0) / (1.0 - tnr_low)  # (TPR_low - delta) / FPR_high
    nonmembers_found = np.maximum(tnr_low - delta, 0.0) / (1.0 - tpr_low)  # (TNR_low - delta) / FNR_high
    ratio = np.where(cut, np.maximum(members_found, nonmembers_found), -1.0)
    best = np.argmax(ratio, axis=1)
    rows = np.arange(ratio.shape[0])
    upper, lower = ranked[rows, best], ranked[rows, best + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        middle = upper / 2 + lower / 2
        bound = np.where(ratio[rows, best] >= 0, np.log(np.maximum(ratio[rows, best], 0.0)), -np.inf)
    return {
        "bound": bound,
        "threshold": np.where(np.isfinite(middle), middle, upper),
        "members_found": members_found[rows, best] >= nonmembers_found[rows, best],
    }


def independent_runs_epsilon(
    select_scores: np.ndarray,
    select_members: np.ndarray,
    eval_scores: np.ndarray,
    eval_members: np.ndarray,
    delta: float = 1e-5,
    confidence: float = 0.95,
    dp_epsilon: float | None = None,
) -> dict[str, Any]:
    """Lower bound on epsilon from independent training runs: one test chosen on some models, evaluated on others.

    Inputs are float [models, n] scores (NaN = no score, higher = more member-like) with bool
    membership of the same shape; the selection and evaluation models are disjoint, and an
    evaluation model's scores may depend only on its own outputs and on the selection models, so
    that, given the membership bits, a sample's outcomes on different evaluation models are
    independent (Jagielski et al., NeurIPS 2020; Nasr et al., IEEE S&P 2021).

    Selection: over every sample j, every cut between distinct selection scores and both
    directions, the test with the largest bound computed on the selection counts (ties: the sample
    whose evaluation membership counts allow the largest bound). The threshold is the midpoint of
    the two scores around the cut. Evaluation: the fixed test on sample j* across the evaluation
    models gives counts tp, fp, tn, fn and, in the chosen direction only (a second direction would be
    a second look at the same data),

        eps_lb = max(log((TPR_low - delta) / FPR_high), 0)   or   max(log((TNR_low - delta) / FNR_high), 0)

    with one-sided Clopper-Pearson bounds at sqrt(confidence) each: member and non-member models
    are independent, so both hold together with probability >= confidence, and an (eps, delta)-DP
    training (TPR <= e^eps FPR + delta, TNR <= e^eps FNR + delta) gives eps_lb <= eps then.
    ``max_possible`` is the bound if every evaluation model fell on the right side: the cap set by
    the number of evaluation models. Data that cannot give a bound (no sample with scored members
    and non-members among both model sets) returns 0 with a "reason"; malformed arguments raise
    MiaError.
    """
    _check_levels(delta, confidence)
    select_scores, select_members = _check_matrix(select_scores, select_members, "selection")
    eval_scores, eval_members = _check_matrix(eval_scores, eval_members, "evaluation")
    if select_scores.shape[1] != eval_scores.shape[1]:
        raise MiaError(f"empirical epsilon: selection ({select_scores.shape[1]}) and evaluation ({eval_scores.shape[1]}) samples differ")
    side = math.sqrt(confidence)
    result: dict[str, Any] = {
        "method": "independent_runs",
        "epsilon_lower_bound": 0.0,
        "delta": delta,
        "confidence": confidence,
        "per_side_confidence": side,
        "n_selection_models": int(select_scores.shape[0]),
        "n_evaluation_models": int(eval_scores.shape[0]),
        "n_trials": 0,
        "citation": INDEPENDENT_RUNS_CITATION,
        "assumptions": INDEPENDENT_RUNS_ASSUMPTIONS,
    }
    eval_scored = ~np.isnan(eval_scores)
    eval_pos = np.count_nonzero(eval_scored & eval_members, axis=0)
    eval_neg = np.count_nonzero(eval_scored & ~eval_members, axis=0)
    usable = (eval_pos > 0) & (eval_neg > 0)
    if select_scores.shape[0] < 2:
        return _no_bound(result, "the selection needs at least 2 models", dp_epsilon)
    if not usable.any():
        return _no_bound(result, "no sample has a scored member and a scored non-member among the evaluation models", dp_epsilon)
    tests = _best_tests(select_scores, select_members, delta, side)
    selection = np.where(usable, tests["bound"], -np.inf)
    if not np.isfinite(selection).any():
        return _no_bound(result, "no sample separates any scored member from a scored non-member on the selection models", dp_epsilon)
    caps = np.maximum(_cap(eval_pos, eval_neg, delta, side), _cap(eval_neg, eval_pos, delta, side))
    best = selection == selection.max()
    canary = int(np.flatnonzero(best)[np.argmax(caps[best])])
    threshold, members_found = float(tests["threshold"][canary]), bool(tests["members_found"][canary])

    scores, truth = eval_scores[:, canary], eval_members[:, canary]
    scored = ~np.isnan(scores)
    called = scores[scored] >= threshold
    truth = truth[scored]
    tp, fp = int(np.sum(called & truth)), int(np.sum(called & ~truth))
    tn, fn = int(np.sum(~called & ~truth)), int(np.sum(~called & truth))
    tpr_low = float(clopper_pearson_lower(tp, tp + fn, side))
    tnr_low = float(clopper_pearson_lower(tn, tn + fp, side))
    if members_found:
        bound, cap = _rate_bound(tpr_low, 1.0 - tnr_low, delta), _cap(tp + fn, tn + fp, delta, side)
    else:
        bound, cap = _rate_bound(tnr_low, 1.0 - tpr_low, delta), _cap(tn + fp, tp + fn, delta, side)
    eps = max(float(bound), 0.0)
    direction = "members" if members_found else "non-members"
    result.update({
        "epsilon_lower_bound": eps,
        "n_trials": tp + fp + tn + fn,
        "canary": canary,
        "threshold": threshold if math.isfinite(threshold) else None,
        "direction": direction,
        "selection_bound": float(tests["bound"][canary]),
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "max_possible": max(float(cap), 0.0),
        "statement": (
            f"With {100 * confidence:g}% confidence no (epsilon, delta = {delta:g})-DP guarantee with epsilon < {eps:.3f} holds for "
            f"this training procedure: the test 'sample {canary} is a {direction[:-1]} iff its score is "
            f"{'>=' if members_found else '<'} {threshold:.6g}', chosen on {select_scores.shape[0]} other models, was evaluated "
            f"once on each of {tp + fp + tn + fn} independently trained models ({tp + fn} with the sample, {tn + fp} without); "
            f"with these models no bound above {max(float(cap), 0.0):.3f} is possible."
        ),
    })
    return _with_theory(result, dp_epsilon)


def _binomial_sf(k: np.ndarray, r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """P[Binomial(r, q) > k], 1 for k < 0."""
    return np.where(k < 0, 1.0, special.bdtrc(np.maximum(k, 0), r, q))


def _binomial_pmf(k: np.ndarray, r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """P[Binomial(r, q) = k], 0 outside 0..r (log-gamma form: exact enough at r in the tens of thousands)."""
    inside = (k >= 0) & (k <= r)
    kk = np.minimum(np.maximum(k, 0), r).astype(np.float64)  # np.clip costs several times more on small arrays
    log_pmf = (special.gammaln(r + 1.0) - special.gammaln(kk + 1.0) - special.gammaln(r - kk + 1.0)
               + special.xlogy(kk, q) + special.xlog1py(r - kk, -q))
    return np.where(inside, np.exp(log_pmf), 0.0)


def _peak_window(r: np.ndarray, v: np.ndarray, q: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """argmax over i in 1..v of P[v - i <= B < v] / i for B ~ Binomial(r, q) (``tail`` = P[B >= v]).

    The window averages the pmf over v-1, v-2, ..., v-i; the pmf is unimodal, so the average rises
    while the next term exceeds it and falls for good once it does not: a binary search (as many
    steps as bits of v) finds the first i where adding pmf(v-i-1) does not raise the average. At or
    above the mode floor((r + 1) q) the next term is the largest so far, so the average rises
    without comparing numbers that underflow to 0 in the upper tail.
    """
    mode = np.floor((r + 1) * q)
    low, high = np.ones_like(v), np.maximum(v, 1)
    for _ in range(int(np.max(high, initial=1)).bit_length() + 1):
        middle = (low + high) // 2
        average = (_binomial_sf(v - middle - 1, r, q) - tail) / middle
        rising = (v - middle - 1 >= mode) | (_binomial_pmf(v - middle - 1, r, q) > average)
        active = low < high
        low = np.where(active & rising, middle + 1, low)
        high = np.where(active & ~rising, middle, high)
    return low


EXACT_SMALL_WINDOWS = 64


def one_run_p_value(guesses: Any, correct: Any, canaries: Any, epsilon: Any, delta: float) -> np.ndarray:
    """P-value of "the training is (epsilon, delta)-DP" after ``correct`` right out of ``guesses`` guesses on ``canaries``.

    Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
    (arXiv:2305.08846), Theorem 3.1: let the algorithm be (eps, delta)-DP in its m canaries, each
    included independently with probability 1/2, let the guesses T in {-1, 0, +1}^m (member,
    abstain, non-member) be any function of its output with r non-abstentions, and W the number of
    correct guesses. Then for every v

        P[W >= v] <= f(v) + 2 m delta max_{i in 1..m} (f(v - i) - f(v)) / i,
        f(v) = P[Binomial(r, e^eps / (e^eps + 1)) >= v],

    so with delta = 0, W is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)). The right
    side at the observed v is the p-value (capped at 1). Only i <= v matters (past v the difference
    stays 1 - f(v) and the ratio falls), and the i-th term is the average of the pmf over
    v-1..v-i, found by ``_peak_window``. Vectorised (broadcast) over all arguments.

    With c = 2 m delta <= 1 this is exactly the theorem's bound, and it is nondecreasing in eps
    (each f(v) + c (f(v-i) - f(v)) / i has derivative r [(1 - c/i) pmf_{r-1}(v-1) + (c/i)
    pmf_{r-1}(v-i-1)] >= 0 in q), which makes the root search of ``one_run_bound`` valid. When
    c > 1 the windows i < c are replaced by the larger, nondecreasing (c/i) f(v-i) (windows
    EXACT_SMALL_WINDOWS < i < c all by (c / (EXACT_SMALL_WINDOWS + 1)) f(v - min(ceil(c) - 1, v))):
    still a valid p-value, and still monotone.
    """
    shape = np.broadcast_shapes(*(np.shape(x) for x in (guesses, correct, canaries, epsilon)))
    r, v, m, eps = (np.broadcast_to(x, shape).ravel() for x in (guesses, correct, canaries, epsilon))
    r, v = r.astype(np.int64), v.astype(np.int64)
    q = special.expit(eps.astype(np.float64))
    c = 2.0 * m.astype(np.float64) * delta
    tail = _binomial_sf(v - 1, r, q)  # f(v)
    first_exact = np.maximum(np.ceil(c).astype(np.int64), 1)  # windows i >= c keep the exact term
    window = np.maximum(_peak_window(r, v, q, tail), first_exact)
    p = np.where(window <= v, tail + c * (_binomial_sf(v - window - 1, r, q) - tail) / window, 0.0)
    loose = np.flatnonzero((first_exact > 1) & (v > 0))  # windows i < c, only where c > 1
    if loose.size:
        rr, vv, qq, cc, ff = r[loose], v[loose], q[loose], c[loose], first_exact[loose]
        i = np.arange(1, int(min(np.max(ff) - 1, np.max(vv), EXACT_SMALL_WINDOWS)) + 1)[:, None]
        terms = np.where((i < ff) & (i <= vv), cc / i * _binomial_sf(vv - i - 1, rr, qq), 0.0).max(axis=0)
        deepest = np.minimum(ff - 1, vv)
        beyond = (deepest > EXACT_SMALL_WINDOWS) * cc / (EXACT_SMALL_WINDOWS + 1) * _binomial_sf(vv - deepest - 1, rr, qq)
        p[loose] = np.maximum(p[loose], np.maximum(terms, beyond))
    return np.where(v > 0, np.minimum(p, 1.0), 1.0).reshape(shape)


def _delta_free_bound(r: np.ndarray, v: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """sup{eps : P[Binomial(r, e^eps/(1+e^eps)) >= v] < alpha} = logit of the Clopper-Pearson lower bound (0 if <= 1/2)."""
    q_low = clopper_pearson_lower(v, r, 1.0 - np.asarray(alpha))
    with np.errstate(divide="ignore"):
        return np.where(q_low > 0.5, special.logit(np.maximum(q_low, 0.5)), 0.0)


def _log_ratio(p: np.ndarray, alpha: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """log(p / alpha), p floored at the smallest normal float; clamped to <= 0 where ``rejected`` (p < alpha) and >= 0 elsewhere."""
    ratio = np.log(np.maximum(p, np.finfo(np.float64).tiny)) - np.log(alpha)
    return np.where(rejected, np.minimum(ratio, 0.0), np.maximum(ratio, 0.0))


def _rejection_end(p_value: Callable[[np.ndarray, np.ndarray], np.ndarray], alpha: np.ndarray, p_zero: np.ndarray,
                   high: np.ndarray) -> np.ndarray:
    """Per element, the lower end of a bracket at most BRACKET_WIDTH wide around sup{eps in [0, high] : p_value < alpha}.

    ``p_value(eps, at)`` gives the p-values of the elements ``at`` (indices) at ``eps``; it is nondecreasing in eps,
    ``p_zero`` (its value at 0) is below alpha, and it is taken as not below alpha at ``high``.
    The Illinois method (Dowell and Jarratt, BIT 11, 1971): regula falsi on log(p / alpha), which keeps a bracket
    [rejected, not rejected], halving the log ratio of an end that stays twice in a row so that both ends converge
    (superlinearly where the p-value is smooth). Each new point lies at least BRACKET_WIDTH / 2 inside the bracket,
    so the search ends. The elements step in lockstep, each leaving once its bracket is narrow enough: 3 to 16
    p-values per element on 1500 random inputs (median 8, counting those at 0 and ``high``), against 34 for a bisection.
    """
    at = np.arange(alpha.size)
    low, high = np.zeros(alpha.size), high.astype(np.float64)
    g_low = _log_ratio(p_zero, alpha, np.ones(at.size, dtype=bool))
    g_high = _log_ratio(p_value(high, at), alpha, np.zeros(at.size, dtype=bool))
    moved = np.zeros(at.size)  # +1: the last step moved the lower end, -1: the upper end
    bound = np.zeros(alpha.size)
    while at.size:
        with np.errstate(invalid="ignore", divide="ignore"):
            secant = np.where(g_high > g_low, (low * g_high - high * g_low) / (g_high - g_low), (low + high) / 2)
        eps = np.clip(secant, low + BRACKET_WIDTH / 2, high - BRACKET_WIDTH / 2)
        p = p_value(eps, at)
        rejected = p < alpha[at]
        g_eps = _log_ratio(p, alpha[at], rejected)
        g_high = np.where(rejected & (moved > 0), g_high / 2, g_high)
        g_low = np.where(~rejected & (moved < 0), g_low / 2, g_low)
        low, g_low = np.where(rejected, eps, low), np.where(rejected, g_eps, g_low)
        high, g_high = np.where(rejected, high, eps), np.where(rejected, g_high, g_eps)
        moved = np.where(rejected, 1.0, -1.0)
        done = high - low <= BRACKET_WIDTH
        bound[at[done]] = low[done]
        at, low, high, g_low, g_high, moved = (x[~done] for x in (at, low, high, g_low, g_high, moved))
    return bound


def one_run_bound(guesses: Any, correct: Any, canaries: Any, delta: float, confidence: Any) -> np.ndarray:
    """Largest eps whose (eps, delta)-DP hypothesis ``one_run_p_value`` rejects at level 1 - confidence (0 if none).

    The p-value is nondecreasing in eps, so the rejected set is an interval [0, eps_lb), whose end lies between 0
    and the delta-free bound (the p-value only grows with the delta term); ``_rejection_end`` brackets it and its
    rejected lower end is returned (conservative by at most BRACKET_WIDTH). Vectorised over all arguments.
    """
    r, v, m, level = (np.asarray(x) for x in np.broadcast_arrays(guesses, correct, canaries, confidence))
    alpha = 1.0 - level.astype(np.float64)
    high = _delta_free_bound(r, v, alpha)
    bound = np.zeros(high.shape)
    p_zero = one_run_p_value(r, v, m, 0.0, delta)
    rejects_zero = (high > 0) & (p_zero < alpha)
    if rejects_zero.any():
        r, v, m = r[rejects_zero], v[rejects_zero], m[rejects_zero]
        bound[rejects_zero] = _rejection_end(lambda eps, at: one_run_p_value(r[at], v[at], m[at], eps, delta),
                                             alpha[rejects_zero], p_zero[rejects_zero], high[rejects_zero])
    return bound


def _ranked_counts(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, members among the k highest scores for every k (NaN last, never counted), and the scored count.

    Returns (members_in_top [T, h + 1], n_scored [T]). Ties fall in an order fixed by the scores
    and the column order only, never by membership, so a guess set read off it is a function of
    the models' outputs.
    """
    order = _descending_order(scores)
    n_scored = np.count_nonzero(~np.isnan(scores), axis=1)
    member = np.take_along_axis(members, order, axis=1) & (np.arange(scores.shape[1]) < n_scored[:, None])
    in_top = np.zeros((scores.shape[0], scores.shape[1] + 1), dtype=np.int64)
    np.cumsum(member, axis=1, out=in_top[:, 1:])
    return in_top, n_scored


def _correct_guesses(ranked: tuple[np.ndarray, np.ndarray], k_plus: np.ndarray, k_minus: np.ndarray) -> np.ndarray:
    """Correct guesses when each row calls its k_plus highest scores members and its k_minus lowest non-members ([T, G]).

    Non-members among the k_minus lowest scored = k_minus - members among them.
    """
    in_top, n_scored = ranked
    n = np.broadcast_to(n_scored[:, None], k_minus.shape)
    members_at_bottom = np.take_along_axis(in_top, n, axis=1) - np.take_along_axis(in_top, n - k_minus, axis=1)
    return np.take_along_axis(in_top, k_plus, axis=1) + k_minus - members_at_bottom


def _split_guesses(totals: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k_plus, k_minus) = (floor(share * total), the rest): member guesses from the top, non-member guesses from the bottom."""
    k_plus = np.floor(share * totals).astype(np.int64)
    return k_plus, totals - k_plus


def one_run_epsilon(
    scores: np.ndarray,
    members: np.ndarray,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    dp_epsilon: float | None = None,
) -> dict[str, Any]:
    """Lower bound on epsilon from canaries with coin-flip membership (Steinke, Nasr and Jagielski, NeurIPS 2023).

    Valid only when every (target, canary) membership was an independent fair coin flip
    (``plan.kind: bernoulli``) and the set of scored pairs was fixed before training (NaN only
    where the plan excludes a pair). Inputs: float [T, n] scores (NaN = not scored) and bool [T, n]
    membership; rows are target models.

    One seeded permutation splits the samples into a selection half and an evaluation half. The
    selection half's memberships are treated as known: conditioning on them leaves the evaluation
    half's T x n/2 memberships independent fair coins, and the T training runs together are
    (eps, delta)-DP in each of them (a (target, canary) bit changes only that target's training
    set), so Theorem 3.1 (``one_run_p_value``) applies to guesses on all evaluation canaries of all
    targets at once, with m = T x (evaluation half size), unscored pairs included. Pooling the targets
    into one test keeps its level at 1 - confidence; a per-target test would need 1 - confidence
    over T, which the delta term (about delta / (fraction guessed x (precision - e^eps/(1+e^eps))))
    cannot beat for T in the hundreds.

    Guesses: of its N_t scored evaluation canaries, target t guesses on r_t = floor(g N_t): its
    floor(s r_t) highest scores are called members and its r_t - floor(s r_t) lowest non-members
    (ties in an order fixed by the scores and the permutation, never by membership). The guessed
    fraction g (from ``GUESS_TOTALS``) and the member share s (from ``MEMBER_SHARES``) maximise the
    bound on the selection half's counts and are then applied, as fractions, to the evaluation half.
    The theorem takes the number of guesses r = sum_t r_t as given, and a total picked by looking at
    the outputs is a data-dependent choice among the candidate totals, so the test runs at level
    (1 - confidence) / (number of candidates): whichever total is picked, the bound holds
    (Bonferroni). Candidates whose all-correct bound is 0 at level (1 - confidence) / 5 (too few
    guesses to beat the delta term) are dropped first; that depends on counts only, not on scores.
    For a fixed total the theorem allows any guesses computed from the models' outputs and the
    known selection memberships, so choosing s costs nothing. v correct guesses out of r give
    ``one_run_bound(r, v, m)``.

    Also reported: the same construction per target ("per_target", each at 1 - (1 - confidence) /
    (T x number of candidate totals), so all of them hold together at ``confidence``) and "max_possible"
    (all r guesses correct). Input without 4 scored canaries returns 0 with a "reason";
    memberships that cannot be fair coin flips raise MiaError.
    """
    _check_levels(delta, confidence)
    scores, members = _check_matrix(scores, members, "one-run")
    n_targets, n_samples = scores.shape
    result: dict[str, Any] = {
        "method": "one_run",
        "epsilon_lower_bound": 0.0,
        "delta": delta,
        "confidence": confidence,
        "n_trials": 0,
        "seed": seed,
        "citation": ONE_RUN_CITATION,
        "assumptions": ONE_RUN_ASSUMPTIONS,
    }
    scored = ~np.isnan(scores)
    if n_targets == 0 or scored.sum() < 4 or n_samples < 2:
        return _no_bound(result, "the one-run audit needs at least 4 scored (target, canary) pairs", dp_epsilon)
    n_scored, n_in = scored.sum(axis=1), (scored & members).sum(axis=1)
    coin = 2.0 * np.minimum(special.bdtr(n_in, n_scored, 0.5), special.bdtrc(n_in - 1, n_scored, 0.5))
    if (coin < COIN_FLIP_REJECTION).any():
        row = int(np.argmin(coin))
        raise MiaError(f"one-run epsilon: target row {row} has {int(n_in[row])} members among {int(n_scored[row])} scored canaries, "
                       "not fair coin flips; the one-run bound needs plan.kind bernoulli (use the independent-runs bound otherwise)")
    order = np.random.default_rng(seed).permutation(n_samples)
    halves = order[: n_samples // 2], order[n_samples // 2:]
    select, evaluate = (_ranked_counts(scores[:, half], members[:, half]) for half in halves)
    m = n_targets * halves[1].size
    possible = np.floor(np.asarray(GUESS_TOTALS)[:, None] * evaluate[1]).astype(np.int64).sum(axis=1)
    useful = one_run_bound(possible, possible, m, delta, 1.0 - (1.0 - confidence) / len(GUESS_TOTALS)) > 0
    candidates = np.asarray(GUESS_TOTALS)[useful] if useful.any() else np.asarray(GUESS_TOTALS)
    alpha = (1.0 - confidence) / candidates.size

    totals, shares = (grid.ravel() for grid in np.meshgrid(candidates, MEMBER_SHARES, indexing="ij"))
    k_plus, k_minus = _split_guesses(np.floor(totals * select[1][:, None]).astype(np.int64), shares)
    r_select = (k_plus + k_minus).sum(axis=0)
    v_select = _correct_guesses(select, k_plus, k_minus).sum(axis=0)
    m_select = n_targets * halves[0].size
    selection_bounds = one_run_bound(r_select, v_select, m_select, delta, 1.0 - alpha)
    chosen = int(np.argmax(selection_bounds))

    per_target_r = np.floor(totals[chosen] * evaluate[1]).astype(np.int64)
    k_plus, k_minus = _split_guesses(per_target_r, shares[chosen])
    per_target_v = _correct_guesses(evaluate, k_plus[:, None], k_minus[:, None])[:, 0]
    r, v = int(per_target_r.sum()), int(per_target_v.sum())
    bounds = one_run_bound(  # one vectorised call: pooled, its all-correct ceiling, then each target
        np.concatenate([[r, r], per_target_r]), np.concatenate([[v, r], per_target_v]),
        np.concatenate([[m, m], np.full(n_targets, halves[1].size)]), delta,
        np.concatenate([[1.0 - alpha] * 2, np.full(n_targets, 1.0 - alpha / n_targets)]),
    )
    eps, ceiling, per_target = float(bounds[0]), float(bounds[1]), bounds[2:]
    result.update({
        "epsilon_lower_bound": eps,
        "n_trials": r,
        "counts": {"guesses": r, "correct": v, "canaries": m, "targets": n_targets},
        "guess_fraction": float(totals[chosen]),
        "member_share": float(shares[chosen]),
        "test_level": alpha,
        "guess_totals": candidates.tolist(),
        "selection_bound": float(selection_bounds[chosen]),
        "max_possible": ceiling,
        "per_target": [
            {"target": t, "epsilon_lower_bound": float(per_target[t]), "k_plus": int(k_plus[t]), "k_minus": int(k_minus[t]),
             "guesses": int(per_target_r[t]), "correct": int(per_target_v[t])}
            for t in range(n_targets)
        ],
        "per_target_confidence": 1.0 - alpha / n_targets,
        "statement": (
            f"With {100 * confidence:g}% confidence the training algorithm is not (epsilon, delta = {delta:g})-DP for any "
            f"epsilon < {eps:.3f}: {v} of {r} membership guesses on held-out coin-flip canaries ({m} (target, canary) pairs "
            f"over {n_targets} target models) were correct, which Theorem 3.1 of Steinke, Nasr and Jagielski (2023) rejects at "
            f"level {alpha:.3g} (Bonferroni over {candidates.size} guess totals); all-correct guesses could give at most {ceiling:.3f}."
        ),
    })
    return _with_theory(result, dp_epsilon)
