"""Attack R of Ye et al. ("Enhanced Membership Inference Attacks against Machine Learning Models", CCS 2022).

Attack R calibrates a loss threshold per sample on reference models that did not train on it: x is
called a member of the target when the target's loss on x lies below the alpha-percentile of x's
reference losses. Sweeping alpha is the same as thresholding the score

    score(t, x) = (|{m in OUT : loss[m, x] > loss[t, x]}| + 1/2 |{m in OUT : loss[m, x] = loss[t, x]}|) / |OUT|,

the fraction of x's OUT reference losses that the target's loss beats (ties count half, the
mid-rank convention), so higher = member. OUT = {m reference of t : not keep[m, x]}, with the
references of t chosen leave-one-out like LiRA's shadows (all m != t, or the ``n_shadows`` lowest
ids other than t). loss = cross-entropy of the true label, averaged over queries. Samples with no
OUT reference get NaN (left out of the metrics, with a warning).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.shadows import NONE_LEFT_OUT, left_out_model


@register_attack
class ReferenceAttack(Attack):
    """Per-sample percentile of the target's loss among OUT reference losses (exact, ties count half)."""

    name = "reference"
    label = "attack R"
    outputs = ("reference_attack_r",)
    threaded_scoring = True
    min_models = 2

    def __init__(self, n_shadows: int | None = None) -> None:
        super().__init__()
        self.n_shadows = n_shadows

    def fit(self, data: AttackData) -> None:
        """Losses of every model on every sample, float64 [M, n]."""
        super().fit(data)
        self.pool, self.k = self.shadow_pool(data.shadow_candidates)
        self.loss = data.loss

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """One [pool, n] comparison per target: vectorised over samples and references."""
        references = self.loss[: self.pool]
        scores = np.full((len(targets), self.data.n_samples), np.nan)
        for row, (target, left) in enumerate(zip(targets, left_out_model(targets, self.k, self.pool))):
            out = ~self.data.keep[: self.pool]
            if left != NONE_LEFT_OUT:
                out[left] = False
            target_loss = self.loss[target]
            above = np.count_nonzero(out & (references > target_loss), axis=0)
            tied = np.count_nonzero(out & (references == target_loss), axis=0)
            count = np.count_nonzero(out, axis=0)
            self.flag_samples(count == 0, "no OUT reference model for some target: no score there, left out of the metrics")
            with np.errstate(invalid="ignore", divide="ignore"):
                scores[row] = np.where(count > 0, (above + 0.5 * tied) / count, np.nan)
        return {"reference_attack_r": scores}

    def params(self) -> dict[str, Any]:
        return {"n_shadows": self.n_shadows}
