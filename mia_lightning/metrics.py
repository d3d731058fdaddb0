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

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.runtime import numpy_parallel_map, numpy_threads

log = logging.getLogger("mia_lightning")

FPR_LEVELS: tuple[float, ...] = (0.001, 0.01, 0.1)
BOOTSTRAP_REPLICATES = 100
CURVE_POINTS = 1000
BOOTSTRAP_WORK = 10**8
"""Pair-replicates the bootstrap may spend: at most BOOTSTRAP_WORK / prefix replicates (never fewer than
BOOTSTRAP_MIN), so 256 targets x 50,000 samples cost about as much as sorting their scores."""
BOOTSTRAP_MIN = 30


def check_bootstrap(replicates: int) -> None:
    """Refuse a replicate count that cannot give an interval: 0 turns the bootstrap off, a spread needs at least 2."""
    if replicates < 0 or replicates == 1:
        raise MiaError(f"--bootstrap {replicates}: give 0 (no bootstrap interval) or at least 2 replicates (default {BOOTSTRAP_REPLICATES})")


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


COUNT_BLOCK = 1 << 20
"""Elements per block of a pass over every pair or ROC vertex (AUC, balanced accuracy, sort keys): temporaries stay small."""
_SIGN = np.uint64(1 << 63)


def ascending_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, ranks): an argsort of float64 ``keys`` (1-D, no NaN; ties in any order) and ``keys[order]`` as order-preserving uint64.

    ``keys`` is consumed: its buffer becomes the integer keys (one 8-byte array less at the peak).

    numpy's argsort compares through an index (2-3x slower than a sort at millions of pairs), so
    each key becomes an unsigned integer with the same order (sign flipped, negatives inverted;
    -0.0 and 0.0 made equal), its lowest bits are replaced by the pair's index and one plain sort
    of those integers gives the order. Keys that differ only in the replaced bits can come out of
    order; those runs (0.27% of adjacent pairs among 12.8M normal scores), each one interval of the
    sorted integers found by binary search, are re-sorted on their full keys, so the result is an
    exact argsort. Two ranks are equal exactly when the keys are.
    """
    n = keys.size
    ranks = np.add(keys, 0.0, out=keys).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    flip = ranks >> np.uint64(63)
    flip *= np.uint64((1 << 63) - 1)
    flip |= _SIGN
    ranks ^= flip  # negatives: every bit inverted; the rest: sign bit set
    low = np.uint64((1 << max(1, (n - 1).bit_length())) - 1)
    packed = np.bitwise_and(ranks, ~low, out=flip)
    for start in range(0, n, COUNT_BLOCK):  # the pair index, a block at a time (no n-long temporary)
        packed[start:start + COUNT_BLOCK] |= np.arange(start, min(start + COUNT_BLOCK, n), dtype=np.uint64)
    packed.sort()
    order = (packed & low).astype(np.int64)
    ranked = ranks[order]
    descents = np.flatnonzero(ranked[1:] < ranked[:-1])  # empty when n < 2
    if descents.size:
        # Only inside a run of equal prefixes can full keys be out of order; packed is sorted, so each run
        # with a descent is one interval of it, found by binary search (no pass over all n pairs).
        prefixes = np.unique(packed[descents] & ~low)
        starts = np.searchsorted(packed, prefixes, side="left")
        lengths = np.searchsorted(packed, prefixes | low, side="right") - starts
        inside = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
        fix = np.lexsort((ranked[inside], np.repeat(np.arange(prefixes.size), lengths)))
        order[inside], ranked[inside] = order[inside][fix], ranked[inside][fix]
    return order, ranked


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
        order, ranked = ascending_order(keys)  # ties in any order: only the ends of tie groups are read
        order, ranked = order[:n_finite], ranked[:n_finite]
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
    float64 for any audit below 2^52 pairs (so summing it in blocks, whose temporaries stay small, changes nothing).
    """
    area2 = 0.0
    for start in range(0, fp.size - 1, COUNT_BLOCK):
        stop = min(start + COUNT_BLOCK, fp.size - 1)
        area2 += np.dot(np.diff(fp[start:stop + 1]), tp[start:stop] + tp[start + 1:stop + 1])
    return float(area2 / (2 * tp[-1] * fp[-1]))


def rank_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic (ties count half), exact: RMIA's tuning of ``a`` compares AUCs for equality."""
    pairs = SortedPairs.build(scores, members)
    return auc_from_counts(*pairs.counts())


def roc_curve(scores: np.ndarray, members: np.ndarray) -> RocCurve:
    """Exact ROC of ``scores`` (higher = member) against boolean ``members`` (any shape; non-finite scores dropped)."""
    return roc_from_counts(*SortedPairs.build(scores, members).counts())


SCAN_CELLS = 1 << 20
"""Sorted positions x replicates per block of the bootstrap's scan (its int64 temporaries stay near 8 MiB)."""
INT16_WEIGHTS_BELOW = 1 << 15
"""Pair weights u * v (Poisson(1) draws, rarely above 100) are scanned as int16 when every product is below this, else int32:
the scan gathers a weight per replicate and position, and narrower weights halve that memory traffic (1.3x per bootstrap)."""


def bootstrap_units(groups: np.ndarray | None, n_samples: int) -> tuple[np.ndarray | None, int]:
    """(unit of each sample or None, number of units): the sampled unit is the user when ``groups`` (int [n_samples]) exists, else the sample."""
    if groups is None:
        return None, n_samples
    if np.shape(groups) != (n_samples,):
        raise ValueError(f"groups has shape {np.shape(groups)}, expected one user id per sample ({n_samples},)")
    _, user_of = np.unique(groups, return_inverse=True)
    return user_of, int(user_of.max()) + 1 if user_of.size else 0


def _poisson_weights(rng: np.random.Generator, replicates: int, n_targets: int, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Poisson(1) weights, int32 [B, n_targets] and [B, n_units], drawn replicate by replicate, targets first (the seed's order)."""
    u, v = np.empty((replicates, n_targets), dtype=np.int32), np.empty((replicates, n_units), dtype=np.int32)
    for b in range(replicates):
        u[b], v[b] = rng.poisson(1.0, n_targets), rng.poisson(1.0, n_units)
    return u, v


@dataclass
class _WeightedScan:
    """Weighted cumulative (TP, FP) of B bootstrap replicates along the sorted order, advanced block by block.

    Pair weights are u[target] * v[sample] (small integers), so the counts are int64 sums, exact
    whatever way the order is cut into blocks (integer prefix sums also run several times faster
    than float ones: they vectorise). Keeps, per replicate, the TP at the last tie-group end whose
    FP is at most each threshold (``best``) and twice the area under the weighted ROC so far
    (``area2``, ties counted half; each block adds an exact int64 sum to it, in float64).
    """

    u: np.ndarray
    v: np.ndarray
    thresholds: np.ndarray
    tp: np.ndarray
    weight: np.ndarray
    end_tp: np.ndarray
    end_fp: np.ndarray
    best: np.ndarray
    area2: np.ndarray
    at: int = 0

    @classmethod
    def start(cls, u: np.ndarray, v: np.ndarray, thresholds: np.ndarray) -> "_WeightedScan":
        """A scan at position 0 for weights u [B, n_targets], v [B, n_samples] and FP thresholds [B, L]."""
        zeros = np.zeros(u.shape[0], dtype=np.int64)
        return cls(u, v, thresholds, zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy(), np.zeros(thresholds.shape, dtype=np.int64),
                   np.zeros(u.shape[0]))

    def subset(self, rows: np.ndarray) -> "_WeightedScan":
        """The scan of replicates ``rows`` only, at the same position (to carry a few of them further down the order)."""
        return _WeightedScan(self.u[rows], self.v[rows], self.thresholds[rows], self.tp[rows], self.weight[rows], self.end_tp[rows],
                             self.end_fp[rows], self.best[rows], self.area2[rows], self.at)

    def absorb(self, rows: np.ndarray, other: "_WeightedScan") -> None:
        """Take back the state of ``subset(rows)`` after it advanced further (``at`` stays: the other replicates did not move)."""
        for name in ("best", "area2", "tp", "weight", "end_tp", "end_fp"):
            getattr(self, name)[rows] = getattr(other, name)

    def advance(self, stop: int, target: np.ndarray, sample: np.ndarray, member: np.ndarray, ends: np.ndarray) -> None:
        """Scan sorted positions ``at``..``stop`` (each position's ``target`` / ``sample`` id, 0/1 ``member`` in the weights' dtype, bool tie-group ``ends``).

        Where every position of a block ends its tie group, a non-member at position c adds
        w_c x 2 TP_c to the doubled area, and FP per position is summed only for a replicate whose
        threshold falls inside the block (each threshold falls in one block).
        """
        block = max(1, SCAN_CELLS // self.u.shape[0])
        for first in range(self.at, stop, block):
            part = slice(first, min(first + block, stop))
            weights = np.take(self.u, target[part], axis=1) * np.take(self.v, sample[part], axis=1)
            hits = weights * member[part]
            misses = weights - hits
            tp = np.cumsum(hits, axis=1, dtype=np.int64)
            tp += self.tp[:, None]
            untied = bool(ends[part].all()) and bool(first == 0 or ends[first - 1])
            fp_before = self.weight - self.tp
            self.weight += weights.sum(axis=1, dtype=np.int64)
            self.tp = tp[:, -1].copy()
            if untied:
                self.area2 += 2 * np.einsum("bc,bc->b", misses, tp)
                self._cross(tp, fp_before, self.weight - self.tp, lambda b: np.cumsum(misses[b], dtype=np.int64) + fp_before[b])
                self.end_tp, self.end_fp = self.tp.copy(), self.weight - self.tp
                continue
            fp = np.cumsum(misses, axis=1, dtype=np.int64)
            fp += fp_before[:, None]
            tp, fp = tp[:, ends[part]], fp[:, ends[part]]
            if not tp.shape[1]:
                continue
            gained = np.diff(fp, axis=1, prepend=self.end_fp[:, None])
            before = np.concatenate([self.end_tp[:, None], tp[:, :-1]], axis=1)
            self.area2 += np.einsum("bc,bc->b", gained, tp) + np.einsum("bc,bc->b", gained, before)
            self._cross(tp, self.end_fp, fp[:, -1], lambda b: fp[b])
            self.end_tp, self.end_fp = tp[:, -1].copy(), fp[:, -1].copy()
        self.at = max(self.at, stop)

    def _cross(self, tp: np.ndarray, fp_before: np.ndarray, fp_last: np.ndarray, row_fp: Callable[[int], np.ndarray]) -> None:
        """Update ``best`` from one block's tie-group ends: TP [B, ends], the FP at the last end before the block and at the
        block's last end [B], and ``row_fp(b)``, replicate b's FP at the block's ends (computed only where a threshold falls inside)."""
        whole = fp_last[:, None] <= self.thresholds  # every end of the block is within the threshold
        self.best = np.where(whole, tp[:, -1:], self.best)
        for b, level in zip(*np.nonzero((fp_before[:, None] <= self.thresholds) & ~whole)):  # each (replicate, level) crosses in one block
            at = np.searchsorted(row_fp(b), self.thresholds[b, level], side="right") - 1
            if at >= 0:  # otherwise the last end before the block, already in ``best``
                self.best[b, level] = tp[b, at]


def _advance_in_threads(scan: _WeightedScan, rows: np.ndarray, stop: int, order: tuple[np.ndarray, ...]) -> None:
    """Advance replicates ``rows`` of ``scan`` to position ``stop``, a share of the replicates per thread.

    Replicates are independent and every sum is an exact integer, so the split changes no number.
    """
    shares = [share for share in np.array_split(rows, numpy_threads()) if share.size]

    def advance(share: np.ndarray) -> _WeightedScan:
        part = scan.subset(share)
        part.advance(stop, *order)
        return part

    for share, part in zip(shares, numpy_parallel_map(advance, shares)):
        scan.absorb(share, part)
    if rows.size == scan.u.shape[0]:
        scan.at = max(scan.at, stop)


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
    measured TPR at each level (the interval's centre). All replicates reuse the one sort and are
    scanned together (``_WeightedScan``), re-weighting only the prefix of the sorted order that
    reaches 1.5 x the largest FPR level; a replicate that needs more continues down the order, and
    large audits use fewer replicates (``BOOTSTRAP_WORK``). The AUC (centre ``auc``, when given)
    needs the whole order, so only the first ``BOOTSTRAP_WORK / pairs`` replicates (at least
    ``BOOTSTRAP_MIN``) measure it.
    Returns ``{"tpr": {level: [low, high], ..., "n_replicates": B}, "auc": [low, high], "auc_replicates": B'}``
    (point +- 1.96 x the replicates' standard deviation, clipped to [0, 1]); ``{}`` when off.
    """
    if replicates <= 0 or pairs.order.size == 0:
        return {}
    n_targets, n_samples = members.shape
    user_of, n_units = bootstrap_units(groups, n_samples)
    levels_arr = np.asarray(levels, dtype=np.float64)
    size = pairs.member.size
    reach = 1.5 * levels_arr.max() * pairs.n_nonmembers
    prefix = min(size, int(np.searchsorted(np.cumsum(~pairs.member), reach, side="right")) + 1)
    replicates = min(replicates, max(BOOTSTRAP_MIN, BOOTSTRAP_WORK // prefix))
    auc_replicates = 0 if auc is None else min(replicates, max(BOOTSTRAP_MIN, BOOTSTRAP_WORK // size))

    u, v = _poisson_weights(np.random.default_rng(seed), replicates, n_targets, n_units)
    if user_of is not None:
        v = v[:, user_of]
    if pairs.order.size == members.size:  # every pair has a finite score
        member_pairs, nonmember_pairs = members, ~members
    else:
        scored = np.zeros(members.size, dtype=bool)
        scored[pairs.order] = True
        member_pairs, nonmember_pairs = members & scored.reshape(members.shape), ~members & scored.reshape(members.shape)
    n_pos, n_neg = (np.einsum("bn,bn->b", (u.astype(np.float32) @ side.astype(np.float32)).astype(np.float64), v) for side in (member_pairs, nonmember_pairs))
    target, sample = np.divmod(pairs.order, n_samples)
    weight_type = np.int16 if int(u.max(initial=0)) * int(v.max(initial=0)) < INT16_WEIGHTS_BELOW else np.int32
    target, sample, member = target.astype(np.int32), sample.astype(np.int32), pairs.member.astype(weight_type)
    scan = _WeightedScan.start(u.astype(weight_type), v.astype(weight_type), levels_arr * n_neg[:, None])
    order = (target, sample, member, pairs.last_of_tie)
    _advance_in_threads(scan, np.arange(replicates), prefix, order)
    further = np.flatnonzero((np.arange(replicates) < auc_replicates) | (scan.weight - scan.tp <= levels_arr.max() * n_neg))
    if further.size and prefix < size:  # these replicates reach further down the order (the AUC needs all of it)
        _advance_in_threads(scan, further, size, order)

    usable = (n_pos > 0) & (n_neg > 0)
    if usable[: auc_replicates if auc is not None else replicates].sum() < 2:  # a spread needs two replicates with both kinds of pair
        log.warning("bootstrap: fewer than 2 of %d replicates drew both members and non-members; no bootstrap interval", replicates)
        return {}
    draws = np.where(usable[:, None], scan.best / np.where(usable, n_pos, 1.0)[:, None], np.nan)
    spread = 1.959964 * np.nanstd(draws, axis=0, ddof=1)
    intervals = {str(level): [float(max(0.0, p - s)), float(min(1.0, p + s))] for level, p, s in zip(levels, point, spread)}
    result: dict = {"tpr": {**intervals, "n_replicates": int(usable.sum())}}
    if auc is not None:
        whole = slice(0, auc_replicates)
        auc_draws = np.where(usable[whole], scan.area2[whole] / np.where(usable[whole], 2.0 * scan.tp[whole] * (scan.weight - scan.tp)[whole], 1.0), np.nan)
        auc_spread = 1.959964 * float(np.nanstd(auc_draws, ddof=1))
        result |= {"auc": [float(max(0.0, auc - auc_spread)), float(min(1.0, auc + auc_spread))],
                   "auc_replicates": int(usable[whole].sum())}
    return result


def _balanced_accuracy(roc: RocCurve) -> float:
    """max over vertices of 1 - (FPR + FNR) / 2, as 1 - min(FPR + FNR) / 2 (the same number: rounding is monotone), in blocks."""
    smallest = np.inf
    for start in range(0, roc.fpr.size, COUNT_BLOCK):
        part = slice(start, start + COUNT_BLOCK)
        smallest = min(smallest, float(np.min(roc.fpr[part] + (1.0 - roc.tpr[part]))))
    return float(1.0 - smallest / 2.0)


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
        "balanced_accuracy": _balanced_accuracy(full),
        "tpr_at_fpr": {str(level): float(value) for level, value in zip(fpr_levels, at)},
        "tpr_at_fpr_ci": {
            str(level): list(clopper_pearson(int(round(value * pairs.n_members)), pairs.n_members)) for level, value in zip(fpr_levels, at)
        },
        "n_distinct_scores": int(tp.size - 1),
        "min_resolvable_fpr": float(full.fpr[np.searchsorted(full.fpr, 0.0, side="right")]),  # the first vertex past FPR 0
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
