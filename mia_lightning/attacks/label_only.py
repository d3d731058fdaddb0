"""Label-only membership inference: the attacker sees only the target's predicted labels.

Choquette-Choo, Tramer, Carlini, Papernot ("Label-Only Membership Inference Attacks", ICML 2021,
data-augmentation attack) and Li & Zhang ("Membership Leakage in Label-Only Exposures", CCS 2021)
query the target on augmented copies of a sample: a training sample stays correctly classified
under more of its augmentations. Here the queries are the experiment's exported query views (image
recipes: identity, flips, shifts; a plan with one query reduces this to the correctness attack of
Yeom et al. 2018). Only argmax_k L[t, j, a, k] is read (the first maximum on ties), never a posterior.

- c[t, j] = |{a : argmax_k L[t, j, a, k] = y_j}|, an integer in 0..Q.
- ``label_only_agreement`` = c / Q: the threshold attack (no shadow models).
- ``label_only_lira``: the likelihood ratio of the count, calibrated on shadows like LiRA with the
  Gaussian replaced by the count's own distribution (it takes Q + 1 values). Over the IN shadows of
  sample j (leave-one-out, as LiRA) h_in(c) counts those with count c, likewise h_out;
  pooled(c) = (h_in(c) + h_out(c)) / (|IN| + |OUT|); p_in(c) = (h_in(c) + pooled(c)) / (|IN| + 1)
  (one pseudo-observation from the pooled distribution), likewise p_out; score =
  log p_in(c[t, j]) - log p_out(c[t, j]), and 0 for a count no shadow produced. No score (NaN, left
  out, with a warning) where j has no IN or no OUT shadow.

  Why this smoothing: leave-one-out makes |IN| one smaller when the target trained on j. Laplace
  smoothing ((h + 1) / (n + Q + 1)) then gives a sample every shadow classifies alike a score that
  depends on |IN| - |OUT|, i.e. on the target's own membership (on the quickstart it turned AUC to
  0.15); shrinking towards the pooled distribution scores such a sample exactly 0.

Scores take at most Q + 1 (agreement) or a few dozen (ratio) distinct values per sample, so low FPRs
are often below what they resolve (the ``min FPR`` column says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.shadows import NONE_LEFT_OUT, left_out_model


def agreement_counts(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int64 [..., n]: how many of the Q queries [..., n, Q, C] the model labels y_j (argmax, first maximum on ties)."""
    predicted = np.asarray(logits).argmax(axis=-1)
    return (predicted == np.asarray(labels)[:, None]).sum(axis=-1).astype(np.int64)


@register_attack
class LabelOnly(Attack):
    """Agreement of predicted labels with the true label across the query views: a threshold and a shadow-calibrated likelihood ratio."""

    name = "label_only"
    label = "label-only"
    outputs = ("label_only_agreement", "label_only_lira")
    requires_logits = True
    min_models = 2

    def __init__(self, n_shadows: int | None = None) -> None:
        super().__init__()
        self.n_shadows = n_shadows

    def fit(self, data: AttackData) -> None:
        """Counts of every model, and per sample the histograms of the counts over the pool's IN and OUT shadows."""
        super().fit(data)
        self.pool, self.k = self.shadow_pool(data.shadow_candidates)
        self.n_queries = data.logits.shape[2]
        block = data.target_batch_size()
        self.counts = np.concatenate([agreement_counts(data.logits[start:start + block], data.labels) for start in range(0, data.n_models, block)])
        counts, member = self.counts[: self.pool], data.keep[: self.pool]
        values = np.arange(self.n_queries + 1)
        self.histogram_in = np.stack([((counts == c) & member).sum(axis=0) for c in values], axis=-1)  # [n, Q + 1]
        self.histogram_out = np.stack([((counts == c) & ~member).sum(axis=0) for c in values], axis=-1)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        counts = self.counts[targets]  # [T, n]
        left = left_out_model(targets, self.k, self.pool)
        inside = (left != NONE_LEFT_OUT)[:, None, None]
        own = np.eye(self.n_queries + 1)[self.counts[np.maximum(left, 0)]] * inside  # the left-out model's one-hot count
        own_in = own * self.data.keep[np.maximum(left, 0)][..., None]
        histogram_in, histogram_out = self.histogram_in - own_in, self.histogram_out - (own - own_in)
        n_in, n_out = histogram_in.sum(axis=-1), histogram_out.sum(axis=-1)
        at = counts[..., None]
        h_in = np.take_along_axis(histogram_in, at, axis=-1)[..., 0]
        h_out = np.take_along_axis(histogram_out, at, axis=-1)[..., 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = (h_in + h_out) / (n_in + n_out)
            ratio = np.log(h_in + pooled) - np.log(n_in + 1) - np.log(h_out + pooled) + np.log(n_out + 1)
        ratio = np.where(pooled == 0, 0.0, ratio)  # a count no shadow produced: no evidence either way
        missing = (n_in == 0) | (n_out == 0)
        self.flag_samples(missing & self.data.audit_mask, "no IN or no OUT shadow for some target: no label_only_lira score there, left out of the metrics")
        return {"label_only_agreement": counts / self.n_queries, "label_only_lira": np.where(missing, np.nan, ratio)}

    def params(self) -> dict[str, Any]:
        return {"n_shadows": self.n_shadows, "n_queries": getattr(self, "n_queries", None), "smoothing": "one pseudo-count from the pooled IN + OUT distribution"}
