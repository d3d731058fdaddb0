"""User-level membership metrics and thresholds chosen on a population set (pure numpy, vectorised).

A user (author, patient) is a member of a model when their texts are in its training set. The
user-level attack of Mireshghallah et al. ("Quantifying Privacy Risks of Masked Language Models
Using Membership Inference Attacks", EMNLP 2022) scores a user by the mean of their samples' scores;
``user_level`` does that for every (target, user) pair so that the shared metrics
(``mia_lightning.metrics.evaluate_scores``) count users, not samples.

``precision_recall_at_fpr`` turns scores into decisions the way an auditor would deploy them: the
threshold is fixed on a population set of known non-members (samples or users no model trained on)
so that at most a stated fraction of them is flagged, and precision / recall are then measured on
the audited pairs. ``rule="paper"`` reproduces the paper's index (the population score at 0-based
position ``int(0.9 p) + 1`` in ascending order, for a 10% budget).
"""

from __future__ import annotations

import warnings

import numpy as np

from mia_lightning.errors import MiaError

REDUCTIONS: tuple[str, ...] = ("mean", "median", "max", "min")
"""How a user's sample scores become one score (NaN sample scores are ignored; a user with none is NaN)."""

THRESHOLD_RULES: tuple[str, ...] = ("budget", "paper")


def _group_order(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids [U] sorted, sample order grouping users together [n], start of each user's run [U])."""
    user_ids, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    return user_ids, order, starts


def _reduce_runs(values: np.ndarray, starts: np.ndarray, reduce: str) -> np.ndarray:
    """Reduce consecutive runs (columns ``starts[k]`` up to ``starts[k+1]``) of ``values`` [T, n] ignoring NaN; NaN for an all-NaN run."""
    finite = np.isfinite(values)
    counts = np.add.reduceat(finite, starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if reduce == "mean":
            reduced = np.add.reduceat(np.where(finite, values, 0.0), starts, axis=1) / counts
        elif reduce == "max":
            reduced = np.maximum.reduceat(np.where(finite, values, -np.inf), starts, axis=1)
        elif reduce == "min":
            reduced = np.minimum.reduceat(np.where(finite, values, np.inf), starts, axis=1)
        else:  # median: pad each run to the longest one with NaN
            lengths = np.diff(np.r_[starts, values.shape[1]])
            run = np.repeat(np.arange(starts.size), lengths)
            padded = np.full((values.shape[0], starts.size, int(lengths.max())), np.nan)
            padded[:, run, np.arange(values.shape[1]) - starts[run]] = np.where(finite, values, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN users stay NaN
                reduced = np.nanmedian(padded, axis=2)
    return np.where(counts > 0, reduced, np.nan)


def user_level(
    scores: np.ndarray,
    members: np.ndarray,
    groups: np.ndarray,
    reduce: str = "mean",
    targets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user scores float64 [T, U], user membership bool [T, U], user ids int64 [U]) from sample scores [T, n].

    A user's score under a target is ``reduce`` of their samples' finite scores (NaN samples, e.g.
    pairs outside the audit, are ignored; a user without any is NaN and left out of the metrics).
    Membership must be constant within a user for each target (a user-grouped plan guarantees it);
    otherwise a one-line ``MiaError`` names the user and the target (``targets`` gives the model ids
    of the rows for that message).
    """
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    groups = np.asarray(groups)
    if reduce not in REDUCTIONS:
        raise MiaError(f"user-level reduce {reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    if scores.ndim != 2 or members.shape != scores.shape:
        raise MiaError(f"user-level metrics: scores {scores.shape} and membership {members.shape} must both be [n_targets, n_samples]")
    if groups.shape != (scores.shape[1],) or not np.issubdtype(groups.dtype, np.integer):
        raise MiaError(f"groups.npy: expected int64 [{scores.shape[1]}] user ids (one per sample), got shape {groups.shape} dtype {groups.dtype}")
    user_ids, order, starts = _group_order(groups)
    grouped_members = members[:, order]
    any_in = np.logical_or.reduceat(grouped_members, starts, axis=1)
    all_in = np.logical_and.reduceat(grouped_members, starts, axis=1)
    mixed = np.argwhere(any_in & ~all_in)
    if mixed.size:
        row, user = (int(i) for i in mixed[0])
        target = int(targets[row]) if targets is not None else row
        raise MiaError(
            f"groups.npy: user {int(user_ids[user])} has both member and non-member samples for target model {target} "
            f"({len(mixed)} such (target, user) pairs); user-level metrics need a user-grouped plan (plan.kind user_grouped)"
        )
    return _reduce_runs(scores[:, order], starts, reduce), any_in, user_ids.astype(np.int64)


def population_thresholds(population_scores: np.ndarray, fpr: float, rule: str = "budget") -> np.ndarray:
    """Per-target thresholds float64 [T] from population scores [T, p]: flag a score when it is above its row's threshold.

    ``budget``: the lowest threshold that flags at most ``floor(fpr * p)`` population scores (the
    stated FPR budget holds exactly on the population, ties included). ``paper``: Mireshghallah et
    al.'s index, the population score at 0-based ascending position ``int((1 - fpr) * p) + 1`` (they use
    fpr = 0.1), which flags the ``p - int((1 - fpr) * p) - 2`` scores above it (distinct scores): about
    ``fpr * p - 2``, one of 30 at 10%. NaN population scores are ignored.
    """
    if rule not in THRESHOLD_RULES:
        raise MiaError(f"threshold rule {rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")
    if not 0.0 <= fpr < 1.0:
        raise MiaError(f"FPR budget {fpr}: must be in [0, 1)")
    population = np.sort(np.asarray(population_scores, dtype=np.float64), axis=1)  # NaN sort last
    counts = np.isfinite(population).sum(axis=1)
    if (counts == 0).any():
        raise MiaError("population: no finite population score for some target; a threshold needs known non-members")
    if rule == "budget":
        rank = counts - np.floor(fpr * counts).astype(np.int64) - 1
    else:
        rank = np.floor((1.0 - fpr) * counts).astype(np.int64) + 1
    past_end = rank >= counts  # the paper's index can run past a tiny population: then nothing is flagged
    picked = population[np.arange(len(population)), np.minimum(rank, counts - 1)]
    return np.where(past_end, np.inf, picked)


def precision_recall_at_fpr(
    scores: np.ndarray,
    members: np.ndarray,
    population_scores: np.ndarray,
    fpr: float = 0.1,
    rule: str = "budget",
) -> dict:
    """Precision and recall of "member iff score > threshold", the threshold chosen per target on a population set.

    ``scores`` / ``members`` [T, m]: the audited pairs (NaN = not scored, left out); ``population_scores``
    [T, p]: each target's scores on known non-members no model trained on (samples, or users after
    ``user_level``). Counts are pooled over targets. Returns the budget, rule, per-target thresholds,
    precision (None when nothing is flagged), recall, the FPR reached on the audited non-members and
    on the population, and the counts.
    """
    scores = np.asarray(scores, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    population_scores = np.asarray(population_scores, dtype=np.float64)
    if scores.ndim != 2 or members.shape != scores.shape or population_scores.ndim != 2 or population_scores.shape[0] != scores.shape[0]:
        raise MiaError(
            f"precision/recall: scores {scores.shape}, membership {members.shape} and population scores {population_scores.shape} "
            "must be [n_targets, n] and [n_targets, p]"
        )
    thresholds = population_thresholds(population_scores, fpr, rule)
    scored = np.isfinite(scores)
    flagged = scored & (scores > thresholds[:, None])
    tp = int((flagged & members).sum())
    fp = int((flagged & ~members).sum())
    n_members, n_nonmembers = int((scored & members).sum()), int((scored & ~members).sum())
    population_flagged = int((population_scores > thresholds[:, None]).sum())
    return {
        "fpr_budget": float(fpr),
        "rule": rule,
        "thresholds": thresholds.tolist(),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / n_members if n_members else None,
        "fpr": fp / n_nonmembers if n_nonmembers else None,
        "population_fpr": population_flagged / int(np.isfinite(population_scores).sum()),
        "n_flagged": tp + fp,
        "n_members": n_members,
        "n_nonmembers": n_nonmembers,
    }
