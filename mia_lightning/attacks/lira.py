"""LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022).

Gaussian fits of the logit-scaled confidence phi over IN and OUT shadow models, leave-one-out over
the targets (exact definitions in docs/attacks.md). Writes five result sets: online and offline,
per-sample and fixed (pooled) variance, and the global threshold on phi.

The defaults are the paper's Gaussian fit. Four parameters switch to the choices of the public
reference implementation (tensorflow/privacy, research/mi_lira_2021/plot.py), so its scores, and
the numbers published with it, can be reproduced:

- ``mu="median"``: per-sample median instead of the mean of the shadow values;
- ``offline="two_sided"``: offline score -log N(phi; mu_out, sd_out) instead of the one-sided log Phi;
- ``fixed_std="global"``: fixed variance as one std of all shadow values (every sample and query)
  around their global mean, taken from the IN values for both online fits and from the OUT values offline;
- ``truncate=True``: each sample keeps only its first k IN (OUT) shadows by model id, k the
  smallest IN (OUT) count over the audited samples.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.special import log_ndtr

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.shadows import NONE_LEFT_OUT, ShadowMoments, left_out_model
from mia_lightning.errors import MiaError

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
CHOICES = {"mu": ("mean", "median"), "offline": ("one_sided", "two_sided"), "fixed_std": ("pooled", "global")}
FEW_SHADOWS_PER_SIDE = 8
"""Below this many IN or OUT shadows, leave-one-out's one-shadow imbalance biases the online scores measurably (docs/attacks.md)."""
UNEQUAL_SIDES = (f"fewer than {FEW_SHADOWS_PER_SIDE} IN or OUT shadows and unequal sides for some target: leave-one-out leaves the target's own side one shadow "
                 "short, which biases online scores toward non-members (no-signal AUC 0.43 with 8 models, 0.49 with 16); "
                 "--params '{\"lira\": {\"truncate\": true}}' fits both sides on equally many shadows")


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


def _masked_mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid, values, np.nan).mean(axis=-1)


@register_attack
class LiRA(Attack):
    """LiRA online/offline x per-sample/fixed variance, plus the global threshold baseline."""

    name = "lira"
    label = "LiRA"
    outputs = ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold")
    threaded_scoring = True
    min_models = 2

    def __init__(
        self,
        n_shadows: int | None = None,
        mu: str = "mean",
        offline: str = "one_sided",
        fixed_std: str = "pooled",
        truncate: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("mu", mu), ("offline", offline), ("fixed_std", fixed_std)):
            if value not in CHOICES[key]:
                raise MiaError(f"--params lira.{key}={value!r}: choose one of {', '.join(CHOICES[key])}")
        self.n_shadows, self.mu, self.offline, self.fixed_std, self.truncate = n_shadows, mu, offline, fixed_std, truncate

    @property
    def reference_fit(self) -> bool:
        """Whether the reference implementation's median / global std / truncation need a fit per target."""
        return self.mu == "median" or self.fixed_std == "global" or self.truncate

    def fit(self, data: AttackData) -> None:
        super().fit(data)
        self.pool, self.k = self.shadow_pool(data.shadow_candidates)
        if not self.reference_fit:
            self.in_moments = ShadowMoments(data.phi, data.keep, self.n_shadows, data.shadow_candidates)
            self.out_moments = ShadowMoments(data.phi, ~data.keep, self.n_shadows, data.shadow_candidates)

    def _moments(self, targets: np.ndarray) -> tuple:
        """(n_in, mu_in, sd_in, fixed_in, n_out, mu_out, sd_out, fixed_out): counts [T, n], means/stds [T, n, Q], fixed stds [T, 1, Q]."""
        n_in, mu_in, var_in, pooled_in = self.in_moments.leave_out(targets)
        n_out, mu_out, var_out, pooled_out = self.out_moments.leave_out(targets)
        sd_in, fb_in = per_sample_std(n_in, var_in, pooled_in)
        sd_out, fb_out = per_sample_std(n_out, var_out, pooled_out)
        audited = self.data.audit_mask
        self.flag_samples(fb_in & audited, "fewer than 2 IN shadows (or zero spread) for some target: per-sample std replaced by the pooled std")
        self.flag_samples(fb_out & audited, "fewer than 2 OUT shadows (or zero spread) for some target: per-sample std replaced by the pooled std")
        fixed_in, fixed_out = pooled_std_or_nan(pooled_in)[:, None, :], pooled_std_or_nan(pooled_out)[:, None, :]
        return n_in, mu_in, sd_in, fixed_in, n_out, mu_out, sd_out, fixed_out

    def _shadow_fit(self, values: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, ...]:
        """(count [n], centre [n, Q], std [n, Q], fixed std [Q]) of one side (IN or OUT) for one target's shadows."""
        if self.truncate:
            audited = self.data.audit_mask
            smallest = int(member[:, audited].sum(axis=0).min()) if audited.any() else 0
            member = member & (np.cumsum(member, axis=0) <= smallest)
        masked = np.where(member[..., None], values, np.nan)
        count = member.sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # samples without shadows stay NaN
            centre = np.nanmedian(masked, axis=0) if self.mu == "median" else np.nanmean(masked, axis=0)
            std = np.nanstd(masked, axis=0)
            if self.fixed_std == "global":  # one std over shadows, samples and queries, as the reference computes it
                fixed = np.full(values.shape[-1], np.nanstd(masked))
            else:
                fixed = np.sqrt(np.nansum((masked - centre) ** 2, axis=(0, 1)) / max(int(count.sum()), 1))
        return count, centre, np.where(std > 0, std, np.nan), np.where(fixed > 0, fixed, np.nan)

    def _reference_moments(self, targets: np.ndarray) -> tuple:
        """Fits with the reference implementation's choices, per target; same layout as ``_moments``, plus the offline fixed std."""
        phi, keep = self.data.phi, self.data.keep
        fits = []
        for left in left_out_model(targets, self.k, self.pool):
            shadows = np.arange(self.pool) if left == NONE_LEFT_OUT else np.delete(np.arange(self.pool), left)
            fits.append([self._shadow_fit(phi[shadows], side) for side in (keep[shadows], ~keep[shadows])])
        (n_in, mu_in, sd_in, fixed_in), (n_out, mu_out, sd_out, fixed_out) = (
            [np.stack([fit[side][part] for fit in fits]) for part in range(4)] for side in (0, 1)
        )
        fixed_in, fixed_out = fixed_in[:, None, :], fixed_out[:, None, :]
        if self.fixed_std == "global":  # the reference's online fixed fit uses the IN std for both Gaussians
            return n_in, mu_in, sd_in, fixed_in, n_out, mu_out, sd_out, fixed_in, fixed_out
        return n_in, mu_in, sd_in, fixed_in, n_out, mu_out, sd_out, fixed_out, fixed_out

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        phi = self.data.phi[targets]
        if self.reference_fit:
            n_in, mu_in, sd_in, fixed_in, n_out, mu_out, sd_out, fixed_out, fixed_offline = self._reference_moments(targets)
        else:
            n_in, mu_in, sd_in, fixed_in, n_out, mu_out, sd_out, fixed_out = self._moments(targets)
            fixed_offline = fixed_out
        audited = self.data.audit_mask
        if self.reference_fit:  # these fits keep the reference's per-sample std: one shadow or zero spread leaves no std (no pooled fallback)
            for n, sd, side in ((n_in, sd_in, "IN"), (n_out, sd_out, "OUT")):
                self.flag_samples((n > 0) & np.isnan(sd).any(axis=-1) & audited,
                                  f"one {side} shadow or zero spread for some target: no per-sample std, so no score of that side's Gaussian there, left out of the metrics")
        if not self.truncate:
            unequal = (n_in != n_out) & (np.minimum(n_in, n_out) < FEW_SHADOWS_PER_SIDE) & (n_in > 0) & (n_out > 0)
            self.flag_samples(unequal & audited, UNEQUAL_SIDES)
        self.flag_samples((n_in == 0) & audited, "no IN shadow for some target: no online score there, left out of the metrics")
        self.flag_samples((n_out == 0) & audited, "no OUT shadow for some target: no online/offline score there, left out of the metrics")
        has_in, has_out = (n_in > 0)[..., None], (n_out > 0)[..., None]
        with np.errstate(invalid="ignore"):
            online = gaussian_logpdf(phi, mu_in, sd_in) - gaussian_logpdf(phi, mu_out, sd_out)
            online_fixed = gaussian_logpdf(phi, mu_in, fixed_in) - gaussian_logpdf(phi, mu_out, fixed_out)
            if self.offline == "two_sided":
                offline = -gaussian_logpdf(phi, mu_out, sd_out)
                offline_fixed = -gaussian_logpdf(phi, mu_out, fixed_offline)
            else:
                offline = log_ndtr((phi - mu_out) / sd_out)
                offline_fixed = log_ndtr((phi - mu_out) / fixed_offline)
        return {
            "lira_online": _masked_mean(online, has_in & has_out),
            "lira_online_fixed": _masked_mean(online_fixed, has_in & has_out),
            "lira_offline": _masked_mean(offline, has_out),
            "lira_offline_fixed": _masked_mean(offline_fixed, has_out),
            "global_threshold": phi.mean(axis=-1),
        }

    def params(self) -> dict[str, Any]:
        return {"n_shadows": self.n_shadows, "mu": self.mu, "offline": self.offline, "fixed_std": self.fixed_std, "truncate": self.truncate}
