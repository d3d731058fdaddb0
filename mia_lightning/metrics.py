"""Membership-inference metrics over (target, sample) pairs: exact ROC, AUC, TPR@FPR with two kinds of interval.

TPR@FPR=x is the largest TPR on the ROC curve among points with FPR <= x; balanced accuracy is the
max over thresholds of 1 - (FPR + FNR) / 2; AUC is the Mann-Whitney statistic (ties count half).
The ROC comes from one sort of the pooled scores with integer counts, so rates are exact ratios
k / N in float64 at any size (tests check it against torchmetrics' ``BinaryROC`` / ``BinaryAUROC``;
those work in float32 and apply a sigmoid to scores outside [0, 1], which would tie LiRA's large scores).

Two intervals for TPR@FPR:
- ``tpr_at_fpr_ci``: Clopper-Pearson 95% over the member pairs, treating pairs as independent
  trials. Pairs that share a target model or a sample are correlated, so this is too narrow when
  many targets are pooled.
- ``tpr_at_fpr_ci_bootstrap``: a two-way bootstrap over targets and samples (Owen, "The pigeonhole
  bootstrap", Annals of Applied Statistics 2007): each replicate gives target t a Poisson(1) weight
  u_t and sample j a weight v_j, pair (t, j) the weight u_t v_j, and recomputes the weighted ROC on
  the same sorted order; the interval is TPR +- 1.96 x the replicates' standard deviation.

When samples come in groups (a user's / patient's / author's texts, ``groups.npy``), samples of one
user are correlated, so the bootstrap resamples users instead: every sample of user g gets the
user's weight w_g (a cluster bootstrap over targets x users; Field and Welsh, "Bootstrapping
clustered data", JRSS-B 2007). Each record names its unit in ``bootstrap_unit``.

The AUC gets the same two-way bootstrap (``auc_ci_bootstrap``; the replicates' weighted Mann-Whitney
statistic over the whole sorted order, ``auc_bootstrap_replicates`` of them: at most
``BOOTSTRAP_WORK`` / pairs, never fewer than ``BOOTSTRAP_MIN``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FPR_LEVELS: tuple[float, ...] = (0.001, 0.01, 0.1)
BOOTSTRAP_REPLICATES = 100
CURVE_POINTS = 1000
BOOTSTRAP_WORK = 10**8
"""Pair-replicates the bootstrap may spend: at most BOOTSTRAP_WORK / prefix replicates (never fewer than
BOOTSTRAP_MIN), so 256 targets x 50,000 samples cost about as much as sorting their scores."""
BOOTSTRAP_MIN = 30


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``successes`` out of ``trials``."""
    from scipy.stats import beta  # scipy.stats takes ~0.5 s to import: not before the options are checked

    if trials == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return (low, high)


@dataclass(frozen=True)
class RocCurve:
    """ROC points (ascending FPR, starting at (0, 0)) of one attack, exact in float64, and the counts behind them.

    ``roc_curve`` gives every vertex; ``evaluate_scores`` keeps the curve only at ``CURVE_POINTS``
    log-spaced FPRs (what a plot resolves), after computing the metrics from every vertex.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    n_positives: int = 0
    n_negatives: int = 0

    def tpr_at(self, levels: np.ndarray | float) -> np.ndarray:
        """Largest TPR among vertices with FPR <= each level (vectorised; the curve is monotone)."""
        position = np.searchsorted(self.fpr, np.asarray(levels, dtype=np.float64), side="right") - 1
        return self.tpr[np.maximum(position, 0)]


@dataclass(frozen=True)
class SortedPairs:
    """Finite (score, member) pairs sorted by descending score, and which positions end a group of tied scores.

    ``order`` maps sorted positions back to the flat pair index (the bootstrap needs each pair's
    target and sample); thresholds sit only at ``last_of_tie`` positions.
    """

    order: np.ndarray
    member: np.ndarray
    last_of_tie: np.ndarray
    n_members: int
    n_nonmembers: int

    @classmethod
    def build(cls, scores: np.ndarray, members: np.ndarray) -> "SortedPairs":
        flat, truth = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(members, dtype=bool).ravel()
        finite = np.isfinite(flat)
        n_finite = int(finite.sum())
        keys = np.negative(flat, where=finite, out=np.full(flat.shape, np.inf))
        order = np.argsort(keys)[:n_finite]  # ties in any order: only the ends of tie groups are read
        ranked = np.sort(keys)[:n_finite]  # the same values as keys[order], without a random gather
        last_of_tie = np.empty(n_finite, dtype=bool)
        np.not_equal(ranked[1:], ranked[:-1], out=last_of_tie[:-1])
        last_of_tie[-1:] = True
        member = truth[order]
        n_members = int(np.count_nonzero(member))
        return cls(order, member, last_of_tie, n_members, n_finite - n_members)

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(true positives, false positives) at every tie-group threshold, with a leading (0, 0).

        Integer-valued float64 (exact below 2^53 pairs), so the AUC can use a BLAS dot product.
        """
        tp = np.zeros(self.member.size + 1)
        np.cumsum(self.member, dtype=np.float64, out=tp[1:])
        fp = np.arange(self.member.size + 1, dtype=np.float64)
        fp -= tp
        if not self.last_of_tie.all():
            keep = np.concatenate([[True], self.last_of_tie])
            tp, fp = tp[keep], fp[keep]
        return tp, fp


def roc_from_counts(tp: np.ndarray, fp: np.ndarray) -> RocCurve:
    """ROC vertices from cumulative counts (the last entry holds the totals)."""
    return RocCurve(fpr=fp / fp[-1], tpr=tp / tp[-1], n_positives=int(round(tp[-1])), n_negatives=int(round(fp[-1])))


def auc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Area under the ROC with ties counted half: exactly the Mann-Whitney statistic.

    Twice the trapezoid sum, sum d_fp * (tp_before + tp_after), is an integer below 2 P N, exact in
    float64 for any audit below 2^52 pairs.
    """
    area2 = np.dot(np.diff(fp), tp[:-1] + tp[1:])
    return float(area2 / (2 * tp[-1] * fp[-1]))


def rank_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic (ties count half), exact: RMIA's tuning of ``a`` compares AUCs for equality."""
    pairs = SortedPairs.build(scores, members)
    return auc_from_counts(*pairs.counts())


def roc_curve(scores: np.ndarray, members: np.ndarray) -> RocCurve:
    """Exact ROC of ``scores`` (higher = member) against boolean ``members`` (any shape; non-finite scores dropped)."""
    return roc_from_counts(*SortedPairs.build(scores, members).counts())


def _weighted_counts(u: np.ndarray, v: np.ndarray, target: np.ndarray, sample: np.ndarray, member: np.ndarray, ends: np.ndarray | None) -> tuple:
    """Weighted cumulative (TP, FP) along the sorted order for pair weights u[target] * v[sample]."""
    weights = u[target] * v[sample]
    tp = np.cumsum(weights * member, dtype=np.float64)
    fp = np.cumsum(weights, dtype=np.float64)
    fp -= tp
    return tp, fp, ends


def _auc_of_weighted(tp: np.ndarray, fp: np.ndarray, ends: np.ndarray | None) -> float:
    """Weighted AUC (ties half) from cumulative weighted counts over the WHOLE sorted order."""
    if ends is not None:
        tp, fp = tp[ends], fp[ends]
    return auc_from_counts(np.concatenate([[0.0], tp]), np.concatenate([[0.0], fp]))


def bootstrap_intervals(
    pairs: SortedPairs,
    members: np.ndarray,
    point: np.ndarray,
    levels: tuple[float, ...],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
    auc: float | None = None,
    groups: np.ndarray | None = None,
) -> dict:
    """Two-way (targets x samples, or targets x users) Poisson bootstrap 95% intervals of TPR@FPR for each level, and of the AUC.

    ``groups`` (int [n_samples], optional) assigns each sample column to a user: a replicate then
    draws one Poisson(1) weight per user and gives it to all of the user's samples.

    ``members`` is the bool [n_targets, n_samples] matrix the pairs came from and ``point`` the
    measured TPR at each level (the interval's centre). Every replicate
    reuses the one sort and re-weights only the prefix of the sorted order that reaches 1.5 x the
    largest FPR level (a replicate that needs more uses the whole order); large audits use fewer
    replicates (``BOOTSTRAP_WORK``). The AUC (centre ``auc``, when given) needs the whole order, so
    only the first ``BOOTSTRAP_WORK / pairs`` replicates (at least ``BOOTSTRAP_MIN``) measure it.
    Returns ``{"tpr": {level: [low, high], ..., "n_replicates": B}, "auc": [low, high], "auc_replicates": B'}``
    (point +- 1.96 x the replicates' standard deviation, clipped to [0, 1]); ``{}`` when off.
    """
    if replicates <= 0 or pairs.order.size == 0:
        return {}
    rng = np.random.default_rng(seed)
    n_targets, n_samples = members.shape
    if groups is None:
        user_of, n_units = None, n_samples
    else:
        if np.shape(groups) != (n_samples,):
            raise ValueError(f"groups has shape {np.shape(groups)}, expected one user id per sample ({n_samples},)")
        _, user_of = np.unique(groups, return_inverse=True)
        n_units = int(user_of.max()) + 1 if user_of.size else 0
    levels_arr = np.asarray(levels, dtype=np.float64)
    scored = np.zeros(members.size, dtype=bool)
    scored[pairs.order] = True
    scored = scored.reshape(members.shape)
    pos_matrix = (members & scored).astype(np.float32)
    neg_matrix = (~members & scored).astype(np.float32)
    reach = 1.5 * levels_arr.max() * pairs.n_nonmembers
    prefix = min(pairs.member.size, int(np.searchsorted(np.cumsum(~pairs.member), reach, side="right")) + 1)

    def slices(stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        target, sample = np.divmod(pairs.order[:stop], n_samples)
        ends = pairs.last_of_tie[:stop]
        return target.astype(np.int32), sample.astype(np.int32), pairs.member[:stop].astype(np.float32), None if ends.all() else ends

    short, full = slices(prefix), None
    replicates = min(replicates, max(BOOTSTRAP_MIN, BOOTSTRAP_WORK // prefix))
    auc_replicates = 0 if auc is None else min(replicates, max(BOOTSTRAP_MIN, BOOTSTRAP_WORK // pairs.member.size))
    draws = np.full((replicates, len(levels)), np.nan)
    auc_draws = np.full(auc_replicates, np.nan)
    for b in range(replicates):
        u, v = rng.poisson(1.0, n_targets).astype(np.float32), rng.poisson(1.0, n_units).astype(np.float32)
        if user_of is not None:
            v = v[user_of]
        n_pos, n_neg = float(u @ pos_matrix @ v), float(u @ neg_matrix @ v)
        if n_pos == 0 or n_neg == 0:
            continue
        whole = b < auc_replicates
        tp, fp, ends = _weighted_counts(u, v, *short)
        if (whole or fp[-1] < levels_arr.max() * n_neg) and prefix < pairs.member.size:  # this replicate reaches further down the order
            full = full or slices(pairs.member.size)
            tp, fp, ends = _weighted_counts(u, v, *full)
        if whole:
            auc_draws[b] = _auc_of_weighted(tp, fp, ends)
        tp_at_ends, fp_at_ends = (tp, fp) if ends is None else (tp[ends], fp[ends])
        last = np.searchsorted(fp_at_ends, levels_arr * n_neg, side="right") - 1  # last tie-group end with FPR <= level
        reached = last >= 0  # otherwise only the threshold above every score (TPR 0) qualifies
        draws[b] = 0.0
        draws[b, reached] = tp_at_ends[last[reached]] / n_pos
    spread = 1.959964 * np.nanstd(draws, axis=0, ddof=1)
    intervals = {str(level): [float(max(0.0, p - s)), float(min(1.0, p + s))] for level, p, s in zip(levels, point, spread)}
    result: dict = {"tpr": {**intervals, "n_replicates": int(np.isfinite(draws[:, 0]).sum())}}
    if auc is not None:
        auc_spread = 1.959964 * float(np.nanstd(auc_draws, ddof=1))
        result |= {"auc": [float(max(0.0, auc - auc_spread)), float(min(1.0, auc + auc_spread))],
                   "auc_replicates": int(np.isfinite(auc_draws).sum())}
    return result


def evaluate_scores(
    scores: np.ndarray,
    members: np.ndarray,
    fpr_levels: tuple[float, ...] = FPR_LEVELS,
    bootstrap: int = 0,
    seed: int = 0,
    groups: np.ndarray | None = None,
    unit: str = "samples",
) -> tuple[dict, RocCurve]:
    """(metrics dict, ROC curve) of ``scores`` against ``members`` (same shape, e.g. [n_targets, n_samples]).

    Pairs whose score is not finite are left out (the caller warns about them). ``bootstrap`` > 0
    adds the two-way bootstrap intervals of TPR@FPR and AUC (needs 2-D scores: targets x columns),
    resampling users when ``groups`` gives each column's user, and names the resampled unit in
    ``bootstrap_unit`` (``unit`` names the columns otherwise, e.g. "users" for user-level scores).
    """
    scores = np.asarray(scores, dtype=np.float64)
    pairs = SortedPairs.build(scores, members)
    if pairs.n_members == 0 or pairs.n_nonmembers == 0:
        raise ValueError(f"metrics need members and non-members with finite scores, got {pairs.n_members} and {pairs.n_nonmembers}")
    tp, fp = pairs.counts()
    full = roc_from_counts(tp, fp)
    at = full.tpr_at(np.asarray(fpr_levels))
    grid = np.concatenate([[0.0], np.logspace(np.log10(1.0 / pairs.n_nonmembers), 0.0, CURVE_POINTS)])
    curve = RocCurve(grid, full.tpr_at(grid), pairs.n_members, pairs.n_nonmembers)
    metrics = {
        "n_members": pairs.n_members,
        "n_nonmembers": pairs.n_nonmembers,
        "auc": auc_from_counts(tp, fp),
        "balanced_accuracy": float(np.max(1.0 - (full.fpr + (1.0 - full.tpr)) / 2.0)),
        "tpr_at_fpr": {str(level): float(value) for level, value in zip(fpr_levels, at)},
        "tpr_at_fpr_ci": {
            str(level): list(clopper_pearson(int(round(value * pairs.n_members)), pairs.n_members)) for level, value in zip(fpr_levels, at)
        },
        "n_distinct_scores": int(tp.size - 1),
        "min_resolvable_fpr": float(full.fpr[np.argmax(full.fpr > 0)]),
    }
    del full, tp, fp
    if bootstrap and scores.ndim == 2:
        boot = bootstrap_intervals(pairs, np.asarray(members, dtype=bool), at, fpr_levels, bootstrap, seed, auc=metrics["auc"], groups=groups)
        if boot:
            metrics |= {"tpr_at_fpr_ci_bootstrap": boot["tpr"], "auc_ci_bootstrap": boot["auc"], "auc_bootstrap_replicates": boot["auc_replicates"],
                        "bootstrap_unit": f"targets x {'users' if groups is not None else unit}"}
    return metrics, curve


def membership_metrics(scores: np.ndarray, members: np.ndarray, fpr_levels: tuple[float, ...] = FPR_LEVELS) -> dict:
    """AUC, balanced accuracy and TPR@FPR (with Clopper-Pearson 95% intervals) over all pairs."""
    return evaluate_scores(scores, members, fpr_levels)[0]
