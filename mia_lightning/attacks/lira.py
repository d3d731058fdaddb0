"""LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022).

Gaussian fits of the logit-scaled confidence phi over IN and OUT shadow models, leave-one-out over
the targets; the exact definitions are in DESIGN.md ("LiRA") and the README. Writes five result
sets: online and offline, per-sample and fixed (pooled) variance, and the global threshold on phi.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_ndtr

from mia_lightning.attacks.base import Attack, register_attack
from mia_lightning.attacks.shadows import ShadowMoments

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def gaussian_logpdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log N(x; mean, std)."""
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - _LOG_SQRT_2PI


def per_sample_std(count: np.ndarray, var: np.ndarray, pooled_var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample std, with the pooled std where fewer than 2 shadows (or zero spread) leave it undefined.

    Returns (std [T, n, Q], bool [T, n] where the fallback was used). NaN where even the pooled std
    is 0 (every sample has at most one shadow): no Gaussian can be fitted there.
    """
    fallback = (count < 2)[..., None] | ~(var > 0)
    pooled = np.where(pooled_var > 0, pooled_var, np.nan)[:, None, :]
    std = np.sqrt(np.where(fallback, pooled, var))
    return std, fallback.any(axis=-1) & (count > 0)


def pooled_std_or_nan(pooled_var: np.ndarray) -> np.ndarray:
    """Pooled ("fixed") std [T, Q]; NaN where it is 0."""
    return np.where(pooled_var > 0, np.sqrt(pooled_var), np.nan)


@register_attack
class LiRA(Attack):
    """LiRA online/offline x per-sample/fixed variance, plus the global threshold baseline."""

    name = "lira"
    label = "LiRA"
    outputs = ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold")

    def __init__(self, n_shadows: int | None = None) -> None:
        super().__init__()
        self.n_shadows = n_shadows

    def fit(self, data) -> None:
        super().fit(data)
        self.in_moments = ShadowMoments(data.phi, data.keep, self.n_shadows)
        self.out_moments = ShadowMoments(data.phi, ~data.keep, self.n_shadows)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        phi = self.data.phi[targets]
        n_in, mu_in, var_in, pooled_in = self.in_moments.leave_out(targets)
        n_out, mu_out, var_out, pooled_out = self.out_moments.leave_out(targets)
        sd_in, fb_in = per_sample_std(n_in, var_in, pooled_in)
        sd_out, fb_out = per_sample_std(n_out, var_out, pooled_out)
        fixed_in, fixed_out = pooled_std_or_nan(pooled_in)[:, None, :], pooled_std_or_nan(pooled_out)[:, None, :]
        has_in, has_out = (n_in > 0)[..., None], (n_out > 0)[..., None]
        audited = self.data.audit_mask
        self.flag_samples(fb_in & audited, "fewer than 2 IN shadows (or zero spread) for some target: per-sample std replaced by the pooled std")
        self.flag_samples(fb_out & audited, "fewer than 2 OUT shadows (or zero spread) for some target: per-sample std replaced by the pooled std")
        self.flag_samples((n_in == 0) & audited, "no IN shadow for some target: no online score there, left out of the metrics")
        self.flag_samples((n_out == 0) & audited, "no OUT shadow for some target: no online/offline score there, left out of the metrics")

        def masked_mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
            return np.where(valid, values, np.nan).mean(axis=-1)

        with np.errstate(invalid="ignore"):
            online = gaussian_logpdf(phi, mu_in, sd_in) - gaussian_logpdf(phi, mu_out, sd_out)
            online_fixed = gaussian_logpdf(phi, mu_in, fixed_in) - gaussian_logpdf(phi, mu_out, fixed_out)
            offline = log_ndtr((phi - mu_out) / sd_out)
            offline_fixed = log_ndtr((phi - mu_out) / fixed_out)
        return {
            "lira_online": masked_mean(online, has_in & has_out),
            "lira_online_fixed": masked_mean(online_fixed, has_in & has_out),
            "lira_offline": masked_mean(offline, has_out),
            "lira_offline_fixed": masked_mean(offline_fixed, has_out),
            "global_threshold": phi.mean(axis=-1),
        }

    def params(self) -> dict[str, Any]:
        return {"n_shadows": self.n_shadows}
