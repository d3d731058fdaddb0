"""Leave-one-out shadow sets as sums: shadow models of target t are a fixed pool minus one model.

With all M models the pool is 0..M-1 and target t itself is left out. With a reference count k
(the few-shadow regime) the shadows are the k lowest ids other than t: the pool is 0..k and the
model left out is t when t <= k, else model k. Sums over the pool are computed once; each target
subtracts one model, so scoring T targets costs O(T * n) instead of O(T * M * n).
"""

from __future__ import annotations

import numpy as np

from mia_lightning.errors import MiaError


def shadow_pool(n_models: int, n_shadows: int | None) -> tuple[int, int | None]:
    """(pool size, k): the pool is models 0..pool-1; validates the requested shadow count."""
    if n_shadows is None:
        return n_models, None
    if not 1 <= n_shadows <= n_models - 1:
        raise MiaError(f"n_shadows={n_shadows}: must be between 1 and n_models - 1 = {n_models - 1}")
    return n_shadows + 1, n_shadows


def left_out_model(targets: np.ndarray, k: int | None) -> np.ndarray:
    """Id of the pool model each target's shadow set leaves out."""
    targets = np.asarray(targets)
    return targets if k is None else np.where(targets <= k, targets, k)


class ShadowMoments:
    """Per-sample count, mean and variance of a statistic over IN (or OUT) shadows, leave-one-out.

    ``values`` float64 [M, n, Q] and ``member`` bool [M, n] (which shadows count). Sums are shifted
    by the per-sample mean over the pool to keep the variance numerically exact in float64.
    """

    def __init__(self, values: np.ndarray, member: np.ndarray, n_shadows: int | None = None) -> None:
        pool, self.k = shadow_pool(values.shape[0], n_shadows)
        self.values, self.member = values, member
        self.shift = values[:pool].mean(axis=0)
        centred = values[:pool] - self.shift
        weights = member[:pool].astype(np.float64)
        self.count = weights.sum(axis=0)
        self.sum1 = np.einsum("mn,mnq->nq", weights, centred)
        self.sum2 = np.einsum("mn,mnq->nq", weights, centred**2)

    def leave_out(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(count [T, n], mean [T, n, Q], var [T, n, Q], pooled var [T, Q]) without each target's left-out model.

        Mean and var are NaN where the count is 0; pooled var is sum_j sum_m (x - mean_j)^2 / sum_j count_j
        (0 when no sample has two shadows: then no spread can be estimated at all).
        """
        out = left_out_model(targets, self.k)
        w = self.member[out].astype(np.float64)
        d = self.values[out] - self.shift
        count = self.count - w
        s1 = self.sum1 - w[..., None] * d
        s2 = self.sum2 - w[..., None] * d**2
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(count > 0, count, np.nan)[..., None]
            mean_centred = s1 / safe
            # a single value deviates from its own mean by exactly 0 (the subtraction above leaves rounding noise)
            squared_dev = np.where((count >= 2)[..., None], np.maximum(s2 - s1 * mean_centred, 0.0), 0.0)
            var = squared_dev / safe
        pooled = np.nansum(squared_dev, axis=1) / count.sum(axis=1, keepdims=False)[..., None]
        return count, mean_centred + self.shift, var, pooled
