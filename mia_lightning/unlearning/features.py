"""What the unlearning attacker sees and computes: published posteriors (after an output defence) and pair features.

Chen et al. ("When Machine Unlearning Jeopardizes Privacy", ACM CCS 2021, Section 4) build the
attack feature of a target sample x from the original model's posterior P_o(x) and the unlearned
model's P_u(x):

- ``direct_diff``: P_o - P_u;
- ``sorted_diff``: the same after ordering both vectors by P_o in descending order (the authors'
  code orders both by the original posterior, so classes stay aligned; ascending there, the same
  features in reverse order);
- ``l2_distance``: ||P_o - P_u||_2 (one number);
- ``direct_concat``: [P_o, P_u];
- ``sorted_concat``: [P_o, P_u], both ordered by P_o in descending order.

The classic attack baselines see one posterior (``original`` or ``unlearned``).

Output defences the paper studies (Section 7), applied by the model owner to every published
posterior, so the attacker's shadow pairs see them too:

- ``label_only``: only the top-1 label (a one-hot vector);
- ``temperature``: temperature scaling, p_T proportional to p^(1/T) (= softmax(z / T) for a single
  model's logits z); T > 1 flattens the posterior;
- ``rounding``: posteriors rounded to ``decimals`` decimal places.

A version made of several models (SISA shards) publishes the mean of their posteriors
(``aggregation: mean``) or the fraction of shards voting for each class (``vote``); a defence
applies to that published vector.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from mia_lightning.errors import MiaError

FEATURES = ("direct_diff", "sorted_diff", "l2_distance", "direct_concat", "sorted_concat")
DEFENCES = ("none", "label_only", "temperature", "rounding")


def aggregate(posteriors: np.ndarray, how: str) -> np.ndarray:
    """[S, N, C] posteriors of a version's S models -> the published [N, C]: their mean, or the shards' vote fractions."""
    if how == "mean":
        return posteriors.mean(axis=0)
    if how == "vote":
        votes = posteriors.argmax(axis=-1)  # [S, N]
        counts = (votes[..., None] == np.arange(posteriors.shape[-1])).sum(axis=0)
        return counts / posteriors.shape[0]
    raise MiaError(f"aggregation {how!r}: choose mean or vote")


def defend(posteriors: np.ndarray, defence: str, temperature: float = 4.0, decimals: int = 1) -> np.ndarray:
    """The posteriors [N, C] a model owner publishes under ``defence``."""
    if defence == "none":
        return posteriors
    if defence == "label_only":
        return (posteriors.argmax(axis=-1)[:, None] == np.arange(posteriors.shape[-1])).astype(np.float64)
    if defence == "temperature":
        with np.errstate(divide="ignore"):
            return softmax(np.log(posteriors) / temperature, axis=-1)
    if defence == "rounding":
        return np.round(posteriors, decimals)
    raise MiaError(f"defence {defence!r}: choose one of {', '.join(DEFENCES)}")


def pair_features(original: np.ndarray, unlearned: np.ndarray, kind: str) -> np.ndarray:
    """Attack features [N, d] of ``kind`` from the original's and the unlearned model's posteriors [N, C]."""
    if kind in ("sorted_diff", "sorted_concat"):
        order = np.argsort(-original, axis=-1, kind="stable")
        original, unlearned = np.take_along_axis(original, order, -1), np.take_along_axis(unlearned, order, -1)
    if kind in ("direct_diff", "sorted_diff"):
        return original - unlearned
    if kind == "l2_distance":
        return np.linalg.norm(original - unlearned, axis=-1, keepdims=True)
    if kind in ("direct_concat", "sorted_concat"):
        return np.concatenate([original, unlearned], axis=-1)
    raise MiaError(f"feature {kind!r}: choose one of {', '.join(FEATURES)}")
