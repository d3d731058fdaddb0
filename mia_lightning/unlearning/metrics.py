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
- ``unit_metrics``: AUC and TPR@FPR with 95% intervals from a two-way bootstrap over the units an
  unlearning plan draws: the target originals (every model of an original's chains, its shards and
  unlearned versions, is one unit, since its items share the original's posterior) and the samples
  (a sample recurs across originals). It reuses the shared metrics' Poisson bootstrap
  (``mia_lightning.metrics.evaluate_scores``; Owen, "The pigeonhole bootstrap", Annals of Applied
  Statistics 2007) on the scores regrouped by original.
"""

from __future__ import annotations

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.metrics import evaluate_scores
from mia_lightning.unlearning.contract import Unlearning

UNIT_REPLICATES = 1000
"""Bootstrap replicates of the report's intervals (a few thousand pairs each: cheap)."""


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


def target_units(unlearning: Unlearning) -> dict[int, int]:
    """Model id -> index of its target original: every model of a target chain belongs to the chain's first version."""
    originals: dict[tuple[int, ...], int] = {}
    units: dict[int, int] = {}
    for chain in unlearning.chains:
        if chain.role == "target":
            unit = originals.setdefault(chain.versions[0], len(originals))
            for version in chain.versions:
                units.update((model, unit) for model in version)
    return units


def by_unit(scores: np.ndarray, members: np.ndarray, rows: list[int], units: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scores [T, n] of model ``rows`` regrouped into [U, n] by target original (a row outside every target chain is its own unit).

    Each (original, sample) is tested once by the plans; a second finite score for one is refused.
    """
    scores, members = np.atleast_2d(np.asarray(scores, dtype=np.float64)), np.atleast_2d(np.asarray(members, dtype=bool))
    index: dict[int, int] = {}
    unit_of = [index.setdefault(units.get(int(m), -1 - r), len(index)) for r, m in enumerate(rows)]
    grouped, truth = np.full((len(index), scores.shape[1]), np.nan), np.zeros((len(index), scores.shape[1]), dtype=bool)
    for r, u in enumerate(unit_of):
        scored = np.isfinite(scores[r])
        if np.isfinite(grouped[u, scored]).any():
            sample = int(np.flatnonzero(scored & np.isfinite(grouped[u]))[0])
            raise MiaError(f"unlearning intervals: sample {sample} is scored twice for the target original of model {rows[r]}")
        grouped[u, scored], truth[u, scored] = scores[r, scored], members[r, scored]
    return grouped, truth


def unit_metrics(scores: np.ndarray, members: np.ndarray, rows: list[int], units: dict[int, int], replicates: int = UNIT_REPLICATES,
                 seed: int = 0) -> dict:
    """AUC, TPR@FPR and their two-way (target originals x samples) bootstrap 95% intervals, from the shared metrics.

    Returns ``evaluate_scores``' dict (``auc_ci_bootstrap``, ``tpr_at_fpr_ci_bootstrap``; the Clopper-Pearson
    ``tpr_at_fpr_ci`` over pairs stays in it, labelled as such) with ``n_units``, the number of target originals.
    """
    grouped, truth = by_unit(scores, members, rows, units)
    tested = np.isfinite(grouped).any(axis=0)  # samples no original tests carry no pairs: drop them (the bootstrap's cost is per cell)
    grouped, truth = grouped[:, tested], truth[:, tested]
    metrics, _ = evaluate_scores(grouped, truth, bootstrap=replicates, seed=seed)
    return metrics | {"n_units": int(np.isfinite(grouped).any(axis=1).sum())}
