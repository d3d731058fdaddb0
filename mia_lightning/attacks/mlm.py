"""Attacks on per-sample signals (``signal.npy``), e.g. minus an MLM loss: the reference-model likelihood ratio and its baselines.

Mireshghallah et al. ("Quantifying Privacy Risks of Masked Language Models Using Membership
Inference Attacks", EMNLP 2022) score a text x by its loss under the target model minus its loss
under a reference model trained on other data: score(x) = -(loss_target(x) - loss_reference(x)).
With signals (higher = more member-like, signal = -loss) that is signal_target - signal_reference.

Which models are references: ``plan.json`` ``info.reference_models`` (the user-grouped plan and the
importers write it), or the attack parameter ``references`` (it wins). With several references their
mean signal is used. Every signal is first averaged over its queries (e.g. repeated maskings).

Outputs:
- ``likelihood_ratio``: target signal minus mean reference signal;
- ``reference_only``: the mean reference signal alone. A reference never trained on any audited
  text separates members from non-members only when the two sets differ in distribution, so an
  AUC far from 0.5 here says the other attacks' numbers are inflated (or deflated) by that shift;
- ``loss_baseline`` (its own attack, no reference needed): the target's signal alone (Yeom et al.,
  "Privacy Risk in Machine Learning", CSF 2018; the paper's baseline);
- ``blind_baseline``: a bag-of-words classifier that never sees any model, trained on each target's
  membership labels and scored out of fold (see ``BlindBaseline``);
- RMIA and attack R run on MLM signals directly: ``AttackData`` reads a signal as a log-likelihood (p = exp(signal)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.errors import MiaError

NEEDS_SIGNAL = "needs a per-sample signal (models/*/signal.npy, e.g. minus an MLM loss) and this experiment exported class logits"


def planned_references(data: AttackData) -> list[int] | None:
    """Reference model ids named by the experiment's plan.json (``info.reference_models``), or None."""
    if data.experiment is None:
        return None
    ids = data.experiment.plan.get("info", {}).get("reference_models")
    return None if ids is None else [int(i) for i in ids]


def mean_signal(data: AttackData, models: np.ndarray) -> np.ndarray:
    """float64 [k, n]: each model's signal averaged over its queries."""
    return np.asarray(data.signal[np.asarray(models)], dtype=np.float64).mean(axis=-1)


class SignalAttack(Attack):
    """An attack that reads ``signal.npy`` (refused, or skipped by ``--attack all``, on logits experiments)."""

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        if data.signal is None:
            return NEEDS_SIGNAL
        return super().unmet_requirement(data)


@register_attack
class LikelihoodRatio(SignalAttack):
    """Target signal minus the mean signal of the reference models (Mireshghallah et al. 2022), plus the reference alone."""

    name = "likelihood_ratio"
    label = "likelihood ratio"
    outputs = ("likelihood_ratio", "reference_only")
    min_models = 2

    def __init__(self, references: list[int] | None = None) -> None:
        super().__init__()
        self.references = None if references is None else [int(i) for i in references]

    def fit(self, data: AttackData) -> None:
        """Resolve the reference models and average their signals once."""
        super().fit(data)
        ids = self.references if self.references is not None else planned_references(data)
        if not ids:
            raise MiaError(
                "likelihood_ratio: no reference model; the experiment's plan.json names none (info.reference_models), "
                "so pass them: --params '{\"likelihood_ratio\": {\"references\": [1]}}'"
            )
        bad = [i for i in ids if not 0 <= i < data.n_models]
        if bad or len(set(ids)) != len(ids):
            raise MiaError(f"likelihood_ratio: references {ids}: each must be a distinct model id in 0..{data.n_models - 1}")
        self.reference_ids = np.asarray(ids, dtype=np.int64)
        self.reference_signal = mean_signal(data, self.reference_ids).mean(axis=0)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        clash = np.intersect1d(targets, self.reference_ids)
        if clash.size:
            raise MiaError(
                f"likelihood_ratio: model {int(clash[0])} is a reference model and cannot be a target; "
                f"choose --targets among the other models (references: {self.reference_ids.tolist()})"
            )
        target_signal = mean_signal(self.data, targets)
        return {
            "likelihood_ratio": target_signal - self.reference_signal,
            "reference_only": np.broadcast_to(self.reference_signal, target_signal.shape).copy(),
        }

    def params(self) -> dict[str, Any]:
        return {"references": self.reference_ids.tolist(), "reference_source": "params" if self.references is not None else "plan.json"}


@register_attack
class LossBaseline(SignalAttack):
    """The target's own signal (minus its loss), averaged over queries: the shadow-free baseline of the paper."""

    name = "loss_baseline"
    label = "loss baseline"
    outputs = ("loss_baseline",)
    shadow_free = True

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        return {"loss_baseline": mean_signal(self.data, targets)}


@register_attack
class BlindBaseline(Attack):
    """A bag-of-words classifier that separates members from non-members from the text alone, never looking at a model.

    Shifted member / non-member distributions (members from one hospital, non-members from another)
    inflate every attack on a model; this baseline measures how much of an AUC the text alone
    explains. For each target, TF-IDF features of every text feed a logistic regression (balanced
    class weights) trained on the target's membership labels of the audited samples, scored out of
    fold: ``n_folds`` folds by user (``groups.npy``; by sample without it), stratified by membership,
    so a user's texts are never both trained on and scored. Population samples (in no model and no
    audit) are scored by a classifier trained on every audited sample, so thresholds can be chosen
    on them. The texts come from the experiment's DataModule (rebuilt from config.yaml, its content
    hash checked against plan.json), so it needs an experiment trained from a text DataModule.
    """

    name = "blind_baseline"
    label = "blind baseline"
    outputs = ("blind_baseline",)
    shadow_free = True

    def __init__(self, n_folds: int = 5, max_features: int = 20000, C: float = 1.0) -> None:
        super().__init__()
        if n_folds < 2:
            raise MiaError(f"--params blind_baseline.n_folds={n_folds}: must be at least 2")
        self.n_folds, self.max_features, self.C = n_folds, max_features, C

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        if data.experiment is None or not data.experiment.config_path.is_file():
            return "needs the texts: an experiment trained by the farm from a text DataModule (config.yaml); imported scores have none"
        return super().unmet_requirement(data)

    def fit(self, data: AttackData) -> None:
        """Rebuild the pool's texts from config.yaml (checked against plan.json) and compute their TF-IDF features once."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        from mia_lightning.farm.export import read_recipe

        super().fit(data)
        datamodule, _ = read_recipe(data.experiment)
        if not hasattr(datamodule, "pool_texts"):
            raise MiaError(f"blind_baseline: {type(datamodule).__name__} has no pool_texts(); the baseline needs a text DataModule")
        texts = datamodule.pool_texts()
        stored = data.experiment.plan.get("recipe", {}).get("pool_fingerprint")
        if len(texts) != data.n_samples or (stored is not None and hasattr(datamodule, "fingerprint") and datamodule.fingerprint() != stored):
            raise MiaError(f"{data.experiment.config_path}: the texts it builds are not the experiment's pool (changed data); the blind baseline cannot run")
        self.features = TfidfVectorizer(max_features=self.max_features, sublinear_tf=True).fit_transform(texts)

    def _folds(self, members: np.ndarray, audited: np.ndarray) -> np.ndarray:
        """int [n] fold of each sample for one target (-1: not audited): by user, stratified by membership.

        Audited users (samples, without ``groups.npy``) are dealt round-robin to the folds in a seeded
        order, members and non-members separately, so every training fold keeps the target's member
        share: unstratified folds anti-correlate the training and test class balance under a plan
        that makes exactly half the users members, which biases the AUC below 0.5.
        """
        units = self.data.groups if self.data.groups is not None else np.arange(self.data.n_samples)
        unit_ids, unit_of = np.unique(units, return_inverse=True)
        unit_member, unit_audited = np.zeros(unit_ids.size, dtype=bool), np.zeros(unit_ids.size, dtype=bool)
        np.logical_or.at(unit_member, unit_of, members)
        np.logical_or.at(unit_audited, unit_of, audited)
        rng = np.random.default_rng(0)
        fold_of_unit = np.full(unit_ids.size, -1)
        for side in (True, False):
            chosen = rng.permutation(np.flatnonzero(unit_audited & (unit_member == side)))
            fold_of_unit[chosen] = np.arange(chosen.size) % self.n_folds
        return np.where(audited, fold_of_unit[unit_of], -1)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        scores = np.full((len(targets), self.data.n_samples), np.nan)
        audited = self.data.audit_pairs(targets)
        for row, target in enumerate(targets):
            labels = self.data.keep[target]
            folds = self._folds(labels, audited[row])
            for fold in range(self.n_folds):
                train, test = np.flatnonzero((folds >= 0) & (folds != fold)), np.flatnonzero(folds == fold)
                if test.size == 0 or labels[train].all() or not labels[train].any():
                    self.flag_samples(np.isin(np.arange(self.data.n_samples), test), "a training fold with a single class: no blind score there")
                    continue
                scores[row, test] = self._classifier(train, labels).decision_function(self.features[test])
            population = np.flatnonzero(~self.data.audit_mask)
            audited_ids = np.flatnonzero(folds >= 0)
            if population.size and labels[audited_ids].any() and not labels[audited_ids].all():  # thresholds are chosen on the population
                scores[row, population] = self._classifier(audited_ids, labels).decision_function(self.features[population])
        return {"blind_baseline": scores}

    def _classifier(self, train: np.ndarray, labels: np.ndarray):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000).fit(self.features[train], labels[train])

    def params(self) -> dict[str, Any]:
        return {"n_folds": self.n_folds, "max_features": self.max_features, "C": self.C, "folds": "by user" if self.data.groups is not None else "by sample"}
