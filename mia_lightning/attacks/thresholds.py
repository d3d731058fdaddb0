"""Shadow-free threshold attacks on the target model's posteriors alone.

Yeom et al. ("Privacy Risk in Machine Learning", CSF 2018) threshold the loss; Song & Mittal
("Systematic Evaluation of Privacy Risks of Machine Learning Models", USENIX Security 2021) compare
loss, prediction confidence, entropy and their modified entropy Mentr, which uses the label. All
four are written so that higher means "more likely a member", in float64, averaged over queries:

- ``loss``: -CE = log p_y (members are fit, so their loss is low);
- ``confidence``: p_y, the probability of the true label (Song & Mittal's confidence attack);
- ``entropy``: -H(p) = sum_k p_k log p_k (members get peaked, low-entropy posteriors);
- ``modified_entropy``: -Mentr(p, y), Mentr = -(1 - p_y) log p_y - sum_{k != y} p_k log(1 - p_k).

log p comes from a log-softmax (stable for confident models); log(1 - p_k) clips its argument at
the smallest positive float64 so that a wrong class with p_k = 1 gives a large finite penalty.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from mia_lightning.attacks.base import Attack, label_index, register_attack, true_class_values

_TINY = np.finfo(np.float64).tiny


def posterior_signals(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The four threshold statistics (higher = member) in float64 [..., n], averaged over queries."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    p = np.exp(log_p)
    log_p_y = true_class_values(log_p, labels)
    p_y = np.exp(log_p_y)
    wrong_terms = p * np.log(np.maximum(1.0 - p, _TINY))
    np.put_along_axis(wrong_terms, label_index(log_p.shape, labels), 0.0, axis=-1)
    mentr = -(1.0 - p_y) * log_p_y - wrong_terms.sum(axis=-1)
    return {
        "loss": log_p_y.mean(axis=-1),
        "confidence": p_y.mean(axis=-1),
        "entropy": (p * log_p).sum(axis=-1).mean(axis=-1),
        "modified_entropy": -mentr.mean(axis=-1),
    }


@register_attack
class ThresholdAttacks(Attack):
    """Loss, confidence, entropy and modified-entropy scores of each target model; no shadow models."""

    name = "thresholds"
    outputs = ("loss", "confidence", "entropy", "modified_entropy")
    threaded_scoring = True
    requires_logits = True
    shadow_free = True

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        return posterior_signals(self.data.logits[targets], self.data.labels)
