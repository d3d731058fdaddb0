"""Metrics of the unlearning attacks beyond the shared ones: DegCount / DegRate, privleak, and an interval for the AUC.

- DegCount and DegRate (Chen et al., "When Machine Unlearning Jeopardizes Privacy", ACM CCS 2021,
  Section 5.1, "degree of privacy degradation"): for every target sample take the confidence with
  which an attack predicts its true status (the attack's probability of "member" for a member,
  one minus it for a non-member). DegCount is the fraction of target samples on which the
  unlearning attack is more confident in the truth than the classical membership inference attack
  on the original model; DegRate is the mean of (unlearning attack's confidence - classical
  attack's confidence). Both compare scores that are probabilities (the attack classifiers').
- privleak (open-unlearning, following MUSE: Shi et al., "MUSE: Machine Unlearning Six-Way
  Evaluation for Language Models", 2024): ((1 - AUC_forget) - (1 - AUC_retain)) / (1 - AUC_retain),
  where AUC_forget is a membership attack's AUC on the unlearned model (forgotten samples vs
  samples never trained on) and AUC_retain the same attack's AUC on the model retrained from
  scratch without the forgotten samples. 0 is perfect unlearning; negative values mean the
  unlearned model still leaks the forgotten samples (open-unlearning reports it in percent).
- ``auc_interval``: a two-way (targets x samples) Poisson bootstrap interval of the AUC, the same
  construction as the shared metrics' TPR intervals (Owen, "The pigeonhole bootstrap", Annals of
  Applied Statistics 2007): AUC +- 1.96 x the replicates' standard deviation.
"""

from __future__ import annotations

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.metrics import SortedPairs, auc_from_counts

AUC_REPLICATES = 200


def true_status_confidence(probability: np.ndarray, member: np.ndarray) -> np.ndarray:
    """The attack's confidence in each sample's true status: p for a member, 1 - p for a non-member."""
    return np.where(member, probability, 1.0 - probability)


def degradation(unlearning: np.ndarray, classic: np.ndarray, member: np.ndarray) -> tuple[float, float]:
    """(DegCount, DegRate) of the unlearning attack over the classic one on the same target samples (probabilities in [0, 1])."""
    unlearning, classic, member = (np.asarray(a).ravel() for a in (unlearning, classic, member))
    scored = np.isfinite(unlearning) & np.isfinite(classic)
    if not scored.any():
        raise MiaError("DegCount/DegRate: no target sample is scored by both attacks")
    if (unlearning[scored] < 0).any() or (unlearning[scored] > 1).any() or (classic[scored] < 0).any() or (classic[scored] > 1).any():
        raise MiaError("DegCount/DegRate compare attack confidences; both scores must be probabilities in [0, 1]")
    gain = true_status_confidence(unlearning[scored], member[scored]) - true_status_confidence(classic[scored], member[scored])
    return float(np.mean(gain > 0)), float(np.mean(gain))


def privleak(auc_forget: float, auc_retain: float) -> float:
    """open-unlearning's privleak as a fraction: ((1 - AUC_forget) - (1 - AUC_retain)) / (1 - AUC_retain)."""
    if not auc_retain < 1.0:
        raise MiaError(f"privleak: the retrained model's AUC is {auc_retain}; the ratio is undefined when it is 1")
    return ((1.0 - auc_forget) - (1.0 - auc_retain)) / (1.0 - auc_retain)


def auc_interval(scores: np.ndarray, members: np.ndarray, replicates: int = AUC_REPLICATES, seed: int = 0) -> tuple[float, float, float]:
    """(AUC, low, high): the AUC over finite (target, sample) pairs of [T, n] scores and its two-way bootstrap 95% interval.

    One sort (the shared ``SortedPairs``); each replicate re-weights the sorted pairs by u[target] x v[sample].
    """
    scores, members = np.atleast_2d(np.asarray(scores, dtype=np.float64)), np.atleast_2d(np.asarray(members, dtype=bool))
    pairs = SortedPairs.build(scores, members)
    if pairs.n_members == 0 or pairs.n_nonmembers == 0:
        raise MiaError("AUC interval: the scored pairs need both members and non-members")
    point = auc_from_counts(*pairs.counts())
    target, sample = np.divmod(pairs.order, scores.shape[1])
    ends = np.concatenate([[True], pairs.last_of_tie])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        weights = rng.poisson(1.0, scores.shape[0])[target] * rng.poisson(1.0, scores.shape[1])[sample]
        tp = np.concatenate([[0.0], np.cumsum(weights * pairs.member, dtype=np.float64)])
        fp = np.concatenate([[0.0], np.cumsum(weights * ~pairs.member, dtype=np.float64)])
        if tp[-1] > 0 and fp[-1] > 0:
            draws.append(auc_from_counts(tp[ends], fp[ends]))
    spread = 1.959964 * float(np.std(draws, ddof=1)) if len(draws) > 1 else float("nan")
    return point, max(0.0, point - spread), min(1.0, point + spread)
