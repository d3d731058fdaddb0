"""The shadow-model attack of Shokri, Stronati, Song and Shmatikov ("Membership Inference Attacks Against
Machine Learning Models", IEEE S&P 2017), on exported logits.

Attack training set: every shadow model's posteriors on the samples it trained on (label 1) and on
those it did not (label 0), optionally followed by the one-hot label (``with_label``). Two attack
designs, both written:

- ``shokri_per_class``: one attack model per class, trained on the shadows' samples of that class and
  applied to the target's samples of that class, on the posterior vector in class order (Shokri et
  al.'s design: the class fixes which entry is the true-class confidence; ``sort_per_class`` sorts it);
- ``shokri_shared``: one attack model for all classes on the posterior vector sorted in decreasing
  order, its ``top_k`` largest entries (Salem et al., "ML-Leaks", NDSS 2019).

The score of (target, sample) is the attack model's membership probability on the target's
posteriors (``attacks/classifiers.py``: ``mlp``, ``logistic``, ``random_forest`` or ``decision_tree``). Shadows: leave-one-out by default (the
candidate models ``AttackData.shadow_candidates`` except the target, or the ``n_shadows`` lowest
ids), so Shokri runs on any farm next to LiRA and RMIA; a plan that lists ``info.shadow_models``
(``disjoint_shadows``) restricts the shadows to those. A shadow contributes only the samples of its
``audit.npy`` row (all non-population samples without one): under ``disjoint_shadows`` the shadows'
half of the pool. The attack models of a batch of targets train at once (``mlp``: one batched
LightningModule; each target masks out its left-out model's rows), so leave-one-out costs one
training per batch, not per target.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.classifier_options import MLPSettings, check_classifier
from mia_lightning.attacks.shadows import left_out_model
from mia_lightning.data.plan import Plan, PlanSpec, make_lira_plan, split_population, takes_options
from mia_lightning.errors import MiaError


def attack_features(posteriors: np.ndarray, labels: np.ndarray, top_k: int | None, with_label: bool, sort: bool = True) -> np.ndarray:
    """float32 [..., n, F]: posteriors [..., n, C] sorted in decreasing order (the ``top_k`` largest) or in class order (``sort=False``), then optionally the one-hot label."""
    ordered = -np.sort(-posteriors, axis=-1)[..., : top_k or posteriors.shape[-1]] if sort else posteriors
    if not with_label:
        return ordered.astype(np.float32)
    one_hot = np.broadcast_to(np.eye(posteriors.shape[-1])[labels], posteriors.shape)
    return np.concatenate([ordered, one_hot], axis=-1).astype(np.float32)


@register_attack
class Shokri(Attack):
    """Shokri et al.'s shadow-model attack: per-class attack classifiers (class-ordered posteriors) and a shared one (sorted posteriors)."""

    name = "shokri"
    label = "Shokri"
    outputs = ("shokri_per_class", "shokri_shared")
    requires_logits = True
    min_models = 2

    def __init__(
        self,
        classifier: str = "mlp",
        with_label: bool = False,
        top_k: int | None = None,
        sort_per_class: bool = False,
        n_shadows: int | None = None,
        hidden: int = 32,
        steps: int = 500,
        batch_size: int = 512,
        lr: float = 2e-3,
        max_rows: int = 200_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_classifier(classifier, "--params shokri.classifier")
        for key, value in (("hidden", hidden), ("steps", steps), ("batch_size", batch_size), ("max_rows", max_rows)):
            if value < 1:
                raise MiaError(f"--params shokri.{key}={value}: must be at least 1")
        if top_k is not None and top_k < 1:
            raise MiaError(f"--params shokri.top_k={top_k}: must be at least 1 (or unset for all classes)")
        if not lr > 0:
            raise MiaError(f"--params shokri.lr={lr}: must be positive")
        self.classifier, self.with_label, self.top_k, self.n_shadows = classifier, with_label, top_k, n_shadows
        self.sort_per_class = sort_per_class
        self.hidden, self.steps, self.batch_size, self.lr, self.max_rows, self.seed = hidden, steps, batch_size, lr, max_rows, seed
        self.mlp = MLPSettings(hidden=hidden, steps=steps, batch_size=batch_size, lr=lr)

    def fit(self, data: AttackData) -> None:
        """Attack training rows of every shadow: posteriors, class, IN/OUT label, shadow id (subsampled to ``max_rows``)."""
        super().fit(data)
        listed = (data.experiment.plan.get("info", {}).get("shadow_models") if data.experiment is not None else None)
        self.listed = bool(listed)
        if listed:
            shadows = np.asarray(sorted(int(m) for m in listed), dtype=np.int64)
            _, self.k = self.shadow_pool(shadows.size)  # n_shadows = k: the k lowest listed ids other than the target
            self.shadows = shadows if self.k is None else shadows[: self.k + 1]
            self.pool = int(self.shadows.size)
            self.shadow_source = "plan info.shadow_models (minus the target)" if self.k is None else f"the {self.k} lowest of plan info.shadow_models other than the target"
        else:
            self.pool, self.k = self.shadow_pool(data.shadow_candidates)
            self.shadows = np.arange(self.pool, dtype=np.int64)
            self.shadow_source = "leave-one-out over the candidate models"
        usable = data.audit_pairs(self.shadows)  # [S, n]
        model_row, sample = np.nonzero(usable)
        if model_row.size > self.max_rows:
            chosen = np.sort(np.random.default_rng(self.seed).choice(model_row.size, self.max_rows, replace=False))
            model_row, sample = model_row[chosen], sample[chosen]
        member = data.keep[self.shadows[model_row], sample]
        if member.all() or not member.any():
            raise MiaError("shokri: the shadows' audited samples are all IN or all OUT; the attack needs both (check the plan)")
        posteriors = np.empty((model_row.size, data.logits.shape[-1]), dtype=np.float32)
        for row, shadow in enumerate(self.shadows):  # one shadow's posteriors in memory at a time
            at = np.flatnonzero(model_row == row)
            if at.size:
                posteriors[at] = data.posteriors(np.array([shadow]))[0].mean(axis=1)[sample[at]]  # [n, C], averaged over queries
        self.rows = {"posteriors": posteriors, "group": data.labels[sample], "member": member.astype(np.float32), "shadow": self.shadows[model_row]}

    def _excluded(self, targets: np.ndarray) -> np.ndarray:
        """Model id each target's attack must not train on (-1 for none): the target itself when it is one of the shadows.

        With ``n_shadows = k`` the pool holds k + 1 shadows and a target outside it leaves out the last
        one, so every target trains on exactly k (the independent-runs epsilon relies on it: an
        evaluation model's attack must not train on another evaluation model).
        """
        if self.k is None:
            return np.where(np.isin(targets, self.shadows), targets, -1)
        if self.listed:
            return np.where(np.isin(targets, self.shadows), targets, self.shadows[-1])
        return np.asarray(left_out_model(targets, self.k, self.pool))

    def design_requests(self, targets: np.ndarray) -> dict[str, dict[str, Any]]:
        """Output name -> the ``attack_scores`` arguments of its design's classifier for ``targets`` (after ``fit``)."""
        data = self.data
        excluded = self._excluded(np.asarray(targets))
        weight = (self.rows["shadow"][None, :] != excluded[:, None]).astype(np.float32)  # [T, R]
        target_posteriors = data.posteriors(np.asarray(targets)).mean(axis=2)  # [T, n, C]
        rows, n_classes = self.rows, data.logits.shape[-1]
        designs = {
            "shokri_per_class": (self.sort_per_class, rows["group"], data.labels, n_classes),
            "shokri_shared": (True, np.zeros_like(rows["group"]), np.zeros_like(data.labels), 1),
        }
        return {
            name: dict(kind=self.classifier, member=rows["member"], weight=weight, group=group, target_group=target_group, n_groups=n_groups, seed=self.seed, mlp=self.mlp,
                       features=attack_features(rows["posteriors"], rows["group"], self.top_k, self.with_label, sort),  # [R, F]
                       target_features=attack_features(target_posteriors, data.labels, self.top_k, self.with_label, sort))  # [T, n, F]
            for name, (sort, group, target_group, n_groups) in designs.items()
        }

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        from mia_lightning.attacks.classifiers import concurrent_attack_scores

        requests = self.design_requests(targets)
        scores = dict(zip(requests, concurrent_attack_scores(list(requests.values()))))  # the two designs' classifiers train side by side
        for values in scores.values():
            self.flag_samples(np.isnan(values), "no IN or no OUT shadow sample of their class: no per-class Shokri score")
        return scores

    def params(self) -> dict[str, Any]:
        return {"classifier": self.classifier, "with_label": self.with_label, "top_k": self.top_k, "sort_per_class": self.sort_per_class, "n_shadows": self.n_shadows,
                "shadows": self.shadow_source,
                "hidden": self.hidden, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "max_rows": self.max_rows, "seed": self.seed}


@takes_options("n_targets")
def make_disjoint_shadows_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """Shokri et al.'s threat model: targets train on one half of the pool, shadows on the other, disjoint half.

    ``plan.options.n_targets`` (default 1) targets are models 0..T-1, each on a random half of the
    target half (LiRA halves when T > 1); the other models are shadows on LiRA halves of the shadow
    half. ``audit.npy`` restricts each model's audit to its own half (a target's non-members are the
    target-half samples it did not train on, never shadow data), and ``info`` lists ``target_models``
    (attack.py's default targets) and ``shadow_models`` (the only shadows Shokri then uses).
    """
    n_targets = spec.options.get("n_targets", 1)
    if not isinstance(n_targets, int) or not 1 <= n_targets <= spec.n_models - 1:
        raise MiaError(f"--plan.options.n_targets {n_targets!r}: must be an integer between 1 and {spec.n_models - 1} (at least one shadow)")
    rng = np.random.default_rng(spec.seed)
    population, audited = split_population(spec, rng)
    order = rng.permutation(audited)
    halves = (np.sort(order[: order.size // 2]), np.sort(order[order.size // 2 :]))
    if min(h.size for h in halves) < 2:
        raise MiaError(f"plan kind disjoint_shadows: the pool has {audited.size} audited samples; each half needs at least 2")
    keep = np.zeros((spec.n_models, spec.n_samples), dtype=bool)
    audit = np.zeros_like(keep)
    for half, models in zip(halves, (np.arange(n_targets), np.arange(n_targets, spec.n_models))):
        half_seed = int(np.random.SeedSequence([spec.seed, int(models[0])]).generate_state(1)[0])
        if models.size == 1:
            keep[models[0], np.random.default_rng(half_seed).permutation(half)[: half.size // 2]] = True
        else:
            keep[np.ix_(models, half)] = make_lira_plan(PlanSpec(spec.dataset, half.size, models.size, seed=half_seed)).keep
        audit[np.ix_(models, half)] = True
    info = {"target_models": list(range(n_targets)), "shadow_models": list(range(n_targets, spec.n_models)),
            "target_half": int(halves[0].size), "shadow_half": int(halves[1].size),
            "membership": "targets train on one half of the pool, shadows on the other (disjoint) half; each model is audited on its own half"}
    return Plan(keep, population, audit=audit, info=info)
