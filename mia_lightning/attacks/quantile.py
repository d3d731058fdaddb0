"""Quantile-regression membership inference (Bertran, Tang, Kearns, Morgenstern, Roth, Wu, "Scalable
Membership Inference Attacks via Quantile Regression", NeurIPS 2023): no shadow models.

The attacker holds public data known not to be in the target's training set (``population.npy``).
For each target model t it queries t on that data, computes the target's confidence score
s_t(z) (LiRA's logit-scaled confidence phi = z_y - logsumexp_{k != y} z_k, averaged over queries),
and fits a regressor q_t(x) of the (1 - alpha) quantile of s_t given the sample's inputs x (its
features and one-hot label) by minimising the pinball loss

    rho_tau(s - q) = max(tau (s - q), (tau - 1)(s - q)),   tau = 1 - alpha,

over the public samples. A sample x is called a member when s_t(x) > q_t(x); the score written is
the margin s_t(x) - q_t(x), so the whole ROC is available and the attack's own decision is the
threshold 0. If q_t is the true conditional quantile, a non-member is flagged with probability
alpha for every x: the decision's FPR is alpha by construction. ``fpr_control`` in results.json
checks this on the held-out non-members (the targets' audited non-members, never seen by the
regressor): the measured FPR at threshold 0 with a two-way bootstrap interval, and the TPR there.

A regressor fitted on few public samples under-predicts the top quantile of samples it did not
see (on the quickstart, 600 public samples and alpha = 1% give an FPR near 7.5%), so by default
half of the public samples are held out and each target's predictions are shifted by a conformal
correction (``conformal_shift``, Romano et al. 2019): FPR <= alpha in expectation over the
calibration draw. ``calibration: 0`` gives the paper's plain regressor.

The regressors of a batch of targets train at once as one batched network (independent weights per
target, one Adam over the stack: Adam acts elementwise, so this is T independent fits), a
LightningModule trained by a Lightning Trainer (``quantile_regressor.py``, loaded to score). Scores
are standardised per target (median and interquartile range on the public data) and the output bias
starts at the marginal quantile, so the regressor starts from the constant-threshold attack and
learns per-sample corrections.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.errors import MiaError
from mia_lightning.metrics import BOOTSTRAP_REPLICATES, bootstrap_units, clopper_pearson


def conformal_shift(residuals: np.ndarray, alpha: float) -> np.ndarray:
    """Per row of held-out residuals s - q [T, m]: the ceil((m + 1)(1 - alpha))-th smallest (the largest when that exceeds m).

    Adding it to q is conformalised quantile regression (Romano, Patterson, Candes, NeurIPS 2019):
    for a non-member exchangeable with the m calibration samples, P(s > q + shift) <= alpha.
    """
    m = residuals.shape[1]
    rank = min(int(np.ceil((m + 1) * (1.0 - alpha))), m)
    return np.sort(residuals, axis=1)[:, rank - 1]


def load_pool_features(data: AttackData) -> np.ndarray | str:
    """float [n, F]: each pool sample's input features (``data.features``, else the experiment recipe's DataModule), or why there are none."""
    if data.features is not None:
        return np.asarray(data.features)
    if data.experiment is None or not data.experiment.config_path.is_file():
        return "needs the samples' input features (config.yaml naming a DataModule with pool_features(), e.g. tabular or image features)"
    from mia_lightning.farm.export import read_recipe

    try:
        datamodule, _ = read_recipe(data.experiment)
    except MiaError as err:
        return f"needs the samples' input features and the recipe's DataModule cannot be rebuilt ({err})"
    if not hasattr(datamodule, "pool_features"):
        return f"needs the samples' input features and {type(datamodule).__name__} (config.yaml) has no pool_features()"
    if not np.array_equal(np.asarray(datamodule.pool_labels()), data.labels):
        return f"needs the samples' input features and the pool that {data.experiment.config_path} builds no longer matches labels.npy (the data changed)"
    data.features = np.asarray(datamodule.pool_features())  # kept: the check and the fit read it once
    return data.features


def conformal_fpr_interval(n_calibration: int, alpha: float, confidence: float = 0.95) -> list[float]:
    """Central ``confidence`` range of the FPR that a conformal shift on ``n_calibration`` samples realises.

    With rank k = ceil((m + 1)(1 - alpha)) <= m, a fresh non-member exceeds the shifted quantile with
    probability Beta(m + 1 - k, k) over the draw of the calibration set (Vovk, "Conditional validity
    of inductive conformal predictors", ACML 2012); its mean (m + 1 - k) / (m + 1) is at most alpha.
    All targets share one calibration set, so their pooled FPR varies this much too. Without
    calibration there is no finite-sample guarantee: the interval is [alpha, alpha].
    """
    if n_calibration == 0:
        return [alpha, alpha]
    rank = min(int(np.ceil((n_calibration + 1) * (1.0 - alpha))), n_calibration)
    tail = (1.0 - confidence) / 2
    return [float(beta.ppf(tail, n_calibration + 1 - rank, rank)), float(beta.ppf(1.0 - tail, n_calibration + 1 - rank, rank))]


def fpr_control(scores: np.ndarray, members: np.ndarray, alpha: float, alpha_interval: list[float], replicates: int = BOOTSTRAP_REPLICATES,
                seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """TPR and FPR of the decision "member iff score > 0" over the scored [T, n] pairs, and whether the FPR is consistent with alpha.

    ``fpr_ci`` is Clopper-Pearson over pairs (too narrow when pairs share targets or samples);
    ``fpr_ci_bootstrap`` the two-way (targets x samples, or targets x users with ``groups``) Poisson bootstrap, the interval to quote.
    ``fpr_consistent`` says whether that interval meets ``alpha_interval`` (the FPRs the calibration
    can realise, ``conformal_fpr_interval``); None without bootstrap replicates, since the pairs'
    interval is too narrow to decide.
    """
    scored = np.isfinite(scores)
    flagged = scored & (np.nan_to_num(scores, nan=-np.inf) > 0)
    non, mem = scored & ~members, scored & members
    n_non, n_mem = int(non.sum()), int(mem.sum())
    false_pos, true_pos = int((flagged & non).sum()), int((flagged & mem).sum())
    fpr = false_pos / n_non
    record = {"alpha": alpha, "alpha_interval": alpha_interval, "threshold": 0.0, "fpr": fpr, "tpr": true_pos / n_mem,
              "n_nonmembers": n_non, "n_members": n_mem, "fpr_ci": list(clopper_pearson(false_pos, n_non))}
    ok = np.zeros(0, dtype=bool)  # replicates that drew non-members
    if replicates > 0:
        rng = np.random.default_rng(seed)
        u = rng.poisson(1.0, (replicates, scores.shape[0])).astype(np.float64)
        user_of, n_units = bootstrap_units(groups, scores.shape[1])
        v = rng.poisson(1.0, (replicates, n_units)).astype(np.float64)
        v = v if user_of is None else v[:, user_of]
        weighted_non = np.einsum("bt,tj,bj->b", u, non.astype(np.float64), v)
        weighted_fp = np.einsum("bt,tj,bj->b", u, (flagged & non).astype(np.float64), v)
        ok = weighted_non > 0
    if ok.sum() >= 2:  # a spread needs two of them
        spread = 1.959964 * np.std(weighted_fp[ok] / weighted_non[ok], ddof=1)
        record["fpr_ci_bootstrap"] = [max(0.0, fpr - spread), min(1.0, fpr + spread)]
        low, high = record["fpr_ci_bootstrap"]
        record["fpr_consistent"] = bool(low <= alpha_interval[1] and alpha_interval[0] <= high)
    else:
        record["fpr_consistent"] = None
    return record


@register_attack
class QuantileRegression(Attack):
    """Bertran et al.'s shadow-free attack: per target, a regressor of the (1 - alpha) quantile of its score on public non-members."""

    name = "quantile"
    label = "quantile regression"
    outputs = ("quantile_regression",)
    requires_logits = True
    shadow_free = True

    def __init__(self, alpha: float = 0.01, calibration: float = 0.5, hidden: int = 64, epochs: int = 100, batch_size: int = 64, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise MiaError(f"--params quantile.alpha={alpha}: the target FPR must lie in (0, 1)")
        if not 0.0 <= calibration < 1.0:
            raise MiaError(f"--params quantile.calibration={calibration}: the share of public samples held out for calibration must lie in [0, 1)")
        if hidden < 0:
            raise MiaError(f"--params quantile.hidden={hidden}: must be 0 (linear) or a positive width")
        for key, value in (("epochs", epochs), ("batch_size", batch_size)):
            if value < 1:
                raise MiaError(f"--params quantile.{key}={value}: must be at least 1")
        if not lr > 0 or weight_decay < 0:
            raise MiaError(f"--params quantile: lr={lr} must be positive and weight_decay={weight_decay} non-negative")
        self.calibration = calibration
        self.alpha, self.hidden, self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed = alpha, hidden, epochs, batch_size, lr, weight_decay, seed

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        problem = super().unmet_requirement(data)
        if problem:
            return problem
        if data.population is None or len(data.population) < 4:
            return "needs public non-member data to train its regressor (population.npy with at least 4 samples: set plan.n_population)"
        features = load_pool_features(data)
        if isinstance(features, str):
            return features
        if features.ndim != 2 or features.shape[0] != data.n_samples:
            return f"needs input features [n_samples={data.n_samples}, F]; the DataModule's pool_features() has shape {features.shape}"
        return None

    def fit(self, data: AttackData) -> None:
        """Standardise the inputs on the public samples and append the one-hot label: x = [(f - mean) / std, onehot(y)]."""
        super().fit(data)
        features = np.asarray(load_pool_features(data), dtype=np.float64)
        public = features[data.population]
        scale = public.std(axis=0)
        standard = (features - public.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
        one_hot = np.eye(data.logits.shape[-1])[data.labels]
        self.inputs = np.concatenate([standard, one_hot], axis=1).astype(np.float32)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        from mia_lightning.attacks.quantile_regressor import fit_quantile_regressors, predict_quantiles

        observed = self.data.phi[targets].mean(axis=-1)  # [T, n]
        public = observed[:, self.data.population]
        centre = np.median(public, axis=1, keepdims=True)
        spread = np.subtract(*np.percentile(public, [75, 25], axis=1, keepdims=True))
        standard = (observed - centre) / np.where(spread > 0, spread, 1.0)
        fit_ids, calibration_ids = self.public_split()
        module = fit_quantile_regressors(self.inputs[fit_ids], standard[:, fit_ids].T, 1.0 - self.alpha,
                                         self.hidden, self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed)
        predicted = predict_quantiles(module, self.inputs)
        if calibration_ids.size:
            predicted += conformal_shift(standard[:, calibration_ids] - predicted[:, calibration_ids], self.alpha)[:, None]
        return {"quantile_regression": standard - predicted}

    def public_split(self) -> tuple[np.ndarray, np.ndarray]:
        """(fit ids, calibration ids): a seeded split of the public samples, ``calibration`` of them held out (at least 2 on each side)."""
        population = np.asarray(self.data.population)
        n_calibration = int(round(self.calibration * population.size))
        if n_calibration:
            n_calibration = min(max(n_calibration, 2), population.size - 2)
        order = np.random.default_rng(self.seed).permutation(population)
        return np.sort(order[n_calibration:]), np.sort(order[:n_calibration])

    def decision_record(self, name: str, scores: np.ndarray, members: np.ndarray, bootstrap: int, groups: np.ndarray | None = None) -> dict:
        """results.json ``fpr_control``: the decision at threshold 0 (FPR alpha by construction), measured on the audited pairs."""
        interval = conformal_fpr_interval(self.public_split()[1].size, self.alpha)
        return {"fpr_control": fpr_control(scores, members, self.alpha, interval, bootstrap, groups=groups)}

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "quantile": 1.0 - self.alpha, "calibration": self.calibration, "statistic": "phi (logit-scaled confidence)", "hidden": self.hidden,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay, "seed": self.seed,
                "public_samples": int(len(self.data.population)) if self.data is not None else None}
