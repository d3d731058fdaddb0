"""RMIA (Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks", ICML 2024).

The likelihood ratio of a sample x is its true-class probability under the target divided by its
mean probability under reference models; the score is the fraction of population samples z whose
ratio x dominates by a factor gamma. Exact definitions in docs/attacks.md ("RMIA"):

- p[m, j]: softmax probability of the true label (float64), averaged over queries.
- References of target t: all m != t, or with ``n_shadows=k`` the k lowest ids other than t
  (``shadows.shadow_pool`` / ``left_out_model``: sums over the pool are formed once and each target
  subtracts one model).
- Reference probability pr(j): online, the mean of p[m, j] over the references; offline,
  ((1 + a) * mean over OUT references + (1 - a)) / 2, NaN where j has no OUT reference.
- Population Z: ``data.population`` when given, else the target's non-members.
- score(x) = |{z in Z : ratio(x) / ratio(z) >= gamma}| / |Z|, with ratio = p[t] / pr; x itself is
  counted when it is in Z (see ``relative_scores``). Population samples with an undefined (NaN)
  offline ratio are not in Z.

Probabilities are assumed positive (float64 softmax underflows only for logit gaps above ~700),
so ratio(x) / ratio(z) >= gamma is evaluated as ratio(z) <= ratio(x) / gamma with one sorted
array of population ratios per target and ``np.searchsorted``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, log, register_attack
from mia_lightning.attacks.shadows import NONE_LEFT_OUT, left_out_model
from mia_lightning.errors import MiaError
from mia_lightning.metrics import rank_auc

A_GRID: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
"""Values of the offline interpolation parameter a tried when it is tuned."""


def offline_reference(mean_out: np.ndarray, a: float) -> np.ndarray:
    """Offline pr = ((1 + a) * mean OUT probability + (1 - a)) / 2: the paper's linear estimate of the IN mean folded in."""
    return ((1.0 + a) * mean_out + (1.0 - a)) / 2.0


@register_attack
class RMIA(Attack):
    """RMIA online (all references) and offline (OUT references with the a-correction)."""

    name = "rmia"
    label = "RMIA"
    outputs = ("rmia_online", "rmia_offline")
    threaded_scoring = True
    min_models = 2

    def __init__(self, gamma: float = 1.0, a: float | None = None, n_shadows: int | None = None) -> None:
        super().__init__()
        if not gamma > 0:
            raise MiaError(f"--params rmia.gamma={gamma}: must be positive")
        if a is not None and not 0.0 <= a <= 1.0:
            raise MiaError(f"--params rmia.a={a}: must lie in [0, 1] (or be left unset to tune it)")
        self.gamma = float(gamma)
        self.a = None if a is None else float(a)
        self.a_tuned = a is None
        self.n_shadows = n_shadows
        self.tuning_auc: dict[str, float] = {}

    def fit(self, data: AttackData) -> None:
        """Sum p over the reference pool (all and OUT only) once, then tune a unless it was given."""
        super().fit(data)
        self.pool, self.k = self.shadow_pool(data.shadow_candidates)
        self.p = data.true_class_probability
        out = ~data.keep[: self.pool]
        self.sum_all = self.p[: self.pool].sum(axis=0)
        self.sum_out = (self.p[: self.pool] * out).sum(axis=0)
        self.count_out = out.sum(axis=0)
        self.population_mask = None
        if data.population is not None:
            self.population_mask = np.zeros(data.n_samples, dtype=bool)
            self.population_mask[data.population] = True
        if self.a_tuned:
            self.a = self._tune_a()

    def references(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean p over all references or NaN, mean p over OUT references or NaN), both float64 [T, n].

        The online mean estimates p(x) over models that did and did not train on x; when no reference
        trained on any audited sample of a target (a disjoint-shadow farm's target half) it is NaN for
        that target, the way LiRA online has no IN fit there, instead of an offline mean in disguise.
        """
        left = left_out_model(targets, self.k, self.pool)
        inside = (left != NONE_LEFT_OUT)[:, None]
        p_left = self.p[np.maximum(left, 0)] * inside
        left_is_out = ~self.data.keep[np.maximum(left, 0)] & inside
        online = (self.sum_all - p_left) / (self.pool - inside)
        count = self.count_out - left_is_out
        count_in = (self.pool - self.count_out) - (inside & ~left_is_out)
        online[~((count_in > 0) & self.data.audit_pairs(targets)).any(axis=1)] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_out = np.where(count > 0, (self.sum_out - p_left * left_is_out) / count, np.nan)
        return online, mean_out

    def relative_scores(self, ratio: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Fraction of population samples z with ratio(z) <= ratio(x) / gamma, per target row; NaN ratio -> NaN.

        A sample in Z (a non-member, without ``population.npy``) compares with itself too: the score is
        then one function of the ratio for every sample. Leaving x out of Z only when x is in it gave a
        member a higher score than a non-member with the same ratio, so ties (saturated probabilities)
        leaked membership.
        """
        scores = np.full(ratio.shape, np.nan)
        for row, target in enumerate(targets):
            x = ratio[row]
            in_z = (self.population_mask if self.population_mask is not None else ~self.data.keep[target]) & np.isfinite(x)
            size = np.count_nonzero(in_z)
            if size:
                scores[row] = np.where(np.isfinite(x), np.searchsorted(np.sort(x[in_z]), x / self.gamma, side="right") / size, np.nan)
        return scores

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        online, mean_out = self.references(targets)
        self.flag_samples(np.isnan(mean_out), "no OUT reference model for some target: no offline score there, left out of the metrics")
        self.flag_samples(np.isnan(online), "no IN reference model for any audited sample of some target: no online score there, left out of the metrics")
        p_target = self.p[targets]
        return {
            "rmia_online": self.relative_scores(p_target / online, targets),
            "rmia_offline": self.relative_scores(p_target / offline_reference(mean_out, self.a), targets),
        }

    def _tune_a(self) -> float:
        """The paper's tuning: offline RMIA on reference model 0 (its own references, same ``n_shadows``), best AUC wins.

        Model 0 is the lowest-id reference of every target but itself; one a serves all targets, so
        when model 0 is also a target its own membership took part in choosing a (one of 11 values).
        Ties go to the smaller a.
        """
        pseudo = np.array([0])
        _, mean_out = self.references(pseudo)
        members = self.data.keep[0]
        best_a, best_auc = A_GRID[0], -np.inf
        for a in A_GRID:
            scores = self.relative_scores(self.p[pseudo] / offline_reference(mean_out, a), pseudo)[0]
            ok = self.data.audit_mask & np.isfinite(scores)
            if not members[ok].any() or members[ok].all():
                raise MiaError("rmia: cannot tune a on reference model 0 (no scored members or non-members); pass a explicitly")
            auc = rank_auc(scores[ok], members[ok])
            self.tuning_auc[str(a)] = auc
            if auc > best_auc:
                best_a, best_auc = a, auc
        log.debug("RMIA: tuned a=%.1f (offline AUC %.4f on reference model 0)", best_a, best_auc)
        return best_a

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"gamma": self.gamma, "a": self.a, "a_tuned": self.a_tuned, "n_shadows": self.n_shadows}
        if self.tuning_auc:
            params["a_tuning_auc"] = dict(self.tuning_auc)
        return params
