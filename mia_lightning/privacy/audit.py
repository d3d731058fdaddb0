"""Which empirical-epsilon construction an attack output gets, and the extra scoring it needs.

A lower bound on epsilon must hold at its stated confidence, so the trials behind it must be
independent (docs/epsilon.md):

- plans whose memberships are independent fair coin flips (``plan.kind: bernoulli``) get the
  one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023), one test pooled over the targets'
  guesses (a membership bit changes only its own target's training run);
- every other plan gets the independent-runs construction (Jagielski et al. 2020; Nasr et al. 2021):
  models 0..k-1 (k = M // 2) are the only shadows; the test (canary sample, threshold) is chosen
  on those k models, scored leave-one-out among themselves, and evaluated once per model on models
  whose scores depend only on themselves and the k selection models. Shadow-free attacks evaluate
  on models k..M-1; attacks with shadows re-score with ``n_shadows`` = k and evaluate on models
  k+1..M-1 (model k is a reference when RMIA tunes its ``a`` on model 0).

A farm whose models derive from each other (``data.plan.model_dependence``: unlearning plans, plans
with parents) gets no bound at all: its models are not independent trials.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np

from mia_lightning.attacks import ATTACKS, AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.data.plan import INDEPENDENT_KINDS
from mia_lightning.privacy.epsilon import independent_runs_epsilon, one_run_epsilon

log = logging.getLogger("mia_lightning")
MIN_MODELS = 4


@dataclass
class _Split:
    """Scores of the selection models (leave-one-out among themselves) and of the evaluation models."""

    select_scores: dict[str, np.ndarray]
    select_members: np.ndarray
    eval_scores: dict[str, np.ndarray]
    eval_members: np.ndarray


class EpsilonAuditor:
    """Empirical epsilon of every attack output of one run, with the construction valid for the experiment's plan.

    Independent-runs bounds need only the selection / evaluation scores, so ``family_bounds`` computes
    them for all of a family's outputs before the run's own scoring and frees them: the two sets of
    scores are never in memory together. The one-run bound reads the run's scores (``run_bound``).
    """

    def __init__(self, data: AttackData, plan_kind: str | None) -> None:
        self.data = data
        self.refusal = f"no bound, the models are not independent trials: {data.dependence}" if data.dependence else None
        self.one_run = plan_kind in INDEPENDENT_KINDS and self.refusal is None

    def family_bounds(self, family: str, params: dict, scored: dict[str, np.ndarray] | None = None, targets: np.ndarray | None = None) -> dict[str, dict] | None:
        """Independent-runs bounds of every output of ``family`` (None under the one-run audit, computed per output later).

        For a shadow-free attack the run's own ``scored`` rows serve when its ``targets`` include every candidate model.
        """
        if self.one_run:
            return None
        split = self.refusal or self._split(family, params, scored, targets)
        if isinstance(split, str):
            return {name: {"method": None, "epsilon_lower_bound": None, "reason": split} for name in create_attack(family, **params).outputs}  # an attack's params may choose its outputs
        return {
            name: independent_runs_epsilon(split.select_scores.pop(name), split.select_members, split.eval_scores.pop(name), split.eval_members)
            for name in list(split.select_scores)
        }

    def run_bound(self, scores: np.ndarray, members: np.ndarray) -> dict:
        """The one-run bound of one output from the run's own [T, n] scores (NaN = not audited)."""
        return one_run_epsilon(scores, members)

    def _scores(self, family: str, params: dict, targets: np.ndarray) -> dict[str, np.ndarray]:
        """The attack's scores on ``targets`` with the audit's pair mask applied; fallback warnings stay quiet (expected with half the shadows)."""
        ours = logging.getLogger("mia_lightning")
        level = ours.level
        ours.setLevel(logging.ERROR)
        try:
            with np.errstate(divide="ignore", invalid="ignore"):
                scored = score_targets(create_attack(family, **params), self.data, targets, purpose="epsilon trials on")
        finally:
            ours.setLevel(level)
        outside = ~self.data.audit_pairs(targets)
        for values in scored.values():  # these scores are the auditor's own: masked in place, no copies
            values[outside] = np.nan
        return scored

    def _split(self, family: str, params: dict, scored: dict[str, np.ndarray] | None = None, targets: np.ndarray | None = None) -> _Split | str:
        """Selection and evaluation scores for the independent-runs construction, or why it cannot be built."""
        n_models = self.data.shadow_candidates  # reference models trained on other data are neither shadows nor trials
        if n_models < MIN_MODELS:
            return f"the independent-runs bound needs at least {MIN_MODELS} models (half select the test, half evaluate it), the experiment has {n_models}"
        k = n_models // 2
        cls = ATTACKS[family]
        select = np.arange(k)
        if cls.shadow_free:
            evaluate = np.arange(k, n_models)
            if scored is not None and targets is not None and np.isin(np.arange(n_models), targets).all():
                rows = np.searchsorted(targets, np.arange(n_models), sorter=np.argsort(targets))
                rows = np.argsort(targets)[rows]
                pairs = self.data.audit_pairs(np.arange(n_models))
                plain = np.array_equal(rows, np.arange(n_models)) and pairs.all()  # views of the run's scores, no copy
                everything = {name: values[:n_models] if plain else np.where(pairs, values[rows], np.nan) for name, values in scored.items()}
            else:
                everything = self._scores(family, params, np.arange(n_models))
            select_scores = {name: values[:k] for name, values in everything.items()}
            eval_scores = {name: values[k:] for name, values in everything.items()}
        elif "n_shadows" in inspect.signature(cls.__init__).parameters:
            evaluate = np.arange(k + 1, n_models)
            select_scores = self._scores(family, {**params, "n_shadows": k - 1}, select)
            eval_scores = self._scores(family, {**params, "n_shadows": k}, evaluate)
        else:
            return f"{family} cannot restrict its shadow models to a subset (no n_shadows parameter), so its trials would not be independent"
        keep = self.data.keep
        return _Split(select_scores, keep[select], eval_scores, keep[evaluate])
