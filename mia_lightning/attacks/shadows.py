"""Leave-one-out shadow sets as sums: shadow models of target t are a fixed pool minus one model.

The candidates are models 0..C-1 (``AttackData.shadow_candidates``: every model, except reference
models a plan trained on other data, which come last). With all candidates the pool is 0..C-1 and
target t itself is left out (nothing is left out for a target outside the pool). With a reference
count k (the few-shadow regime) the shadows are the k lowest ids other than t: the pool is 0..k and
the model left out is t when t <= k, else model k. Sums over the pool are computed once; each
target subtracts at most one model, so scoring T targets costs O(T * n) instead of O(T * M * n).
"""

from __future__ import annotations

import numpy as np

from mia_lightning.errors import MiaError


NONE_LEFT_OUT = -1
"""``left_out_model``'s answer for a target outside the pool: its shadows are the whole pool."""


def shadow_pool(n_candidates: int, n_shadows: int | None, option: str = "n_shadows") -> tuple[int, int | None]:
    """(pool size, k): the pool is models 0..pool-1; validates the requested shadow count (``option`` names it in the error)."""
    if n_shadows is None:
        return n_candidates, None
    if not 1 <= n_shadows <= n_candidates - 1:
        raise MiaError(f"{option}={n_shadows}: must be between 1 and {n_candidates - 1} (the models that can serve as shadows, less one)")
    return n_shadows + 1, n_shadows


ZERO_SPREAD_ULPS = 4.0
"""Rounding noise left by ``s2 - s1 * mean`` for identical values, in units of eps x count x s2."""


def deviations_from_sums(count: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean of the shifted values, variance, sum of squared deviations from the mean), all [..., Q]; mean and variance NaN where the count is 0.

    ``count`` [...], ``s1`` / ``s2`` [..., Q]: per-sample sums of shifted values and of their squares. The
    sum of squared deviations is 0 for fewer than two values and where what is left is rounding noise:
    identical values whose shift does not cancel them (the pool mean includes other models) leave
    ~eps x s2, which as a variance would give a std of ~1e-8 instead of the documented fallback.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        safe = np.where(count > 0, count, np.nan)[..., None]
        mean = s1 / safe
        squared = s2 - s1 * mean
        noise = ZERO_SPREAD_ULPS * np.finfo(np.float64).eps * np.maximum(count, 1.0)[..., None] * s2
        squared = np.where((count >= 2)[..., None] & (squared > noise), squared, 0.0)
        return mean, squared / safe, squared


def left_out_model(targets: np.ndarray, k: int | None, pool: int) -> np.ndarray:
    """Id of the pool model each target's shadow set leaves out (``NONE_LEFT_OUT`` for a target outside the pool)."""
    targets = np.asarray(targets)
    if k is None:
        return np.where(targets < pool, targets, NONE_LEFT_OUT)
    return np.where(targets <= k, targets, k)


class ShadowMoments:
    """Per-sample count, mean and variance of a statistic over IN (or OUT) shadows, leave-one-out.

    ``values`` float64 [M, n, Q] and ``member`` bool [M, n] (which shadows count). Sums are shifted
    by the per-sample mean over the pool to keep the variance numerically exact in float64.
    """

    def __init__(self, values: np.ndarray, member: np.ndarray, n_shadows: int | None = None, candidates: int | None = None, block: int = 16) -> None:
        pool, self.k = shadow_pool(values.shape[0] if candidates is None else candidates, n_shadows)
        self.pool = pool
        self.values, self.member = values, member
        self.shift = values[:pool].mean(axis=0)
        self.count = member[:pool].sum(axis=0).astype(np.float64)
        self.sum1, self.sum2 = np.zeros_like(self.shift), np.zeros_like(self.shift)
        for start in range(0, pool, block):  # blocks of models: temporaries stay [block, n, Q]
            stop = min(start + block, pool)
            centred = values[start:stop] - self.shift
            weights = member[start:stop].astype(np.float64)
            self.sum1 += np.einsum("mn,mnq->nq", weights, centred)
            self.sum2 += np.einsum("mn,mnq->nq", weights, centred**2)

    def leave_out(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(count [T, n], mean [T, n, Q], var [T, n, Q], pooled var [T, Q]) without each target's left-out model.

        Mean and var are NaN where the count is 0; pooled var is sum_j sum_m (x - mean_j)^2 / sum_j count_j
        (0 when no sample has two shadows: then no spread can be estimated at all). Targets that leave out
        the same model (every target outside the pool) share one computation.
        """
        out = left_out_model(targets, self.k, self.pool)
        left, inverse = np.unique(out, return_inverse=True)
        if left.size < out.size:
            return tuple(part[inverse] for part in self._without(left))
        return self._without(out)

    def _without(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``leave_out``'s moments for the left-out model ids ``out`` (``NONE_LEFT_OUT``: the whole pool)."""
        inside = (out != NONE_LEFT_OUT)[:, None]
        w = (self.member[np.maximum(out, 0)] & inside).astype(np.float64)
        d = self.values[np.maximum(out, 0)] - self.shift
        count = self.count - w
        s1 = self.sum1 - w[..., None] * d
        s2 = self.sum2 - w[..., None] * d**2
        mean_centred, var, squared_dev = deviations_from_sums(count, s1, s2)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = np.nansum(squared_dev, axis=1) / count.sum(axis=1, keepdims=False)[..., None]
        return count, mean_centred + self.shift, var, pooled
