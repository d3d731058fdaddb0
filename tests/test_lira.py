"""LiRA scores against a straightforward per-(target, sample, query) loop over DESIGN.md's definitions."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy.stats import norm

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.base import logit_scaled_confidence
from mia_lightning.attacks.module import score_targets


def make_data(n_models=9, n_samples=30, n_queries=3, n_classes=4, seed=0) -> AttackData:
    rng = np.random.default_rng(seed)
    keep = rng.random((n_models, n_samples)) < 0.5
    labels = rng.integers(0, n_classes, n_samples)
    logits = rng.normal(size=(n_models, n_samples, n_queries, n_classes)).astype(np.float32)
    logits[..., 0] += 2.0 * keep[..., None]  # members a bit more confident in class 0 ...
    logits[np.arange(n_models)[:, None], np.arange(n_samples)[None, :], :, labels[None, :]] += 1.5 * keep[..., None]
    return AttackData(keep=keep, labels=labels, logits=logits)


def phi_loop(logits: np.ndarray, label: int) -> float:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return math.log(p[label]) - math.log(sum(p[k] for k in range(len(p)) if k != label))


def reference_lira(data: AttackData, targets, n_shadows=None) -> dict[str, np.ndarray]:
    """The paper's Gaussian fits written as plain loops (DESIGN.md 'LiRA')."""
    M, n, Q, _ = data.logits.shape
    phi = np.array([[[phi_loop(data.logits[m, j, a], data.labels[j]) for a in range(Q)] for j in range(n)] for m in range(M)])
    out = {k: np.full((len(targets), n), np.nan) for k in ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold")}
    for ti, t in enumerate(targets):
        shadows = [m for m in range(M) if m != t]
        if n_shadows is not None:
            shadows = shadows[:n_shadows]
        stats = {}
        for side, flag in (("in", True), ("out", False)):
            mu, sd, cnt = np.full((n, Q), np.nan), np.full((n, Q), np.nan), np.zeros(n, int)
            pooled_num, pooled_den = np.zeros(Q), 0
            for j in range(n):
                group = [m for m in shadows if data.keep[m, j] == flag]
                cnt[j] = len(group)
                if group:
                    values = phi[group, j, :]
                    mu[j] = values.mean(0)
                    sd[j] = values.std(0)
                    pooled_num += ((values - mu[j]) ** 2).sum(0)
                    pooled_den += len(group)
            pooled = np.sqrt(pooled_num / pooled_den)
            sd_used = np.where((cnt[:, None] < 2) | (sd == 0), pooled[None, :], sd)
            stats[side] = (mu, sd_used, pooled, cnt)
        for j in range(n):
            x = phi[t, j]
            mu_i, sd_i, pool_i, c_i = stats["in"]
            mu_o, sd_o, pool_o, c_o = stats["out"]
            out["global_threshold"][ti, j] = x.mean()
            if c_o[j] > 0:
                out["lira_offline"][ti, j] = np.mean([norm.logcdf((x[a] - mu_o[j, a]) / sd_o[j, a]) for a in range(Q)])
                out["lira_offline_fixed"][ti, j] = np.mean([norm.logcdf((x[a] - mu_o[j, a]) / pool_o[a]) for a in range(Q)])
            if c_o[j] > 0 and c_i[j] > 0:
                out["lira_online"][ti, j] = np.mean([norm.logpdf(x[a], mu_i[j, a], sd_i[j, a]) - norm.logpdf(x[a], mu_o[j, a], sd_o[j, a]) for a in range(Q)])
                out["lira_online_fixed"][ti, j] = np.mean([norm.logpdf(x[a], mu_i[j, a], pool_i[a]) - norm.logpdf(x[a], mu_o[j, a], pool_o[a]) for a in range(Q)])
    return out


def test_phi_is_stable_for_confident_logits():
    logits = np.array([[[[60.0, 0.0, -5.0]]]], dtype=np.float32)
    phi = logit_scaled_confidence(logits, np.array([0]))
    assert np.isfinite(phi).all()
    assert phi[0, 0, 0] == pytest.approx(60.0 - np.log(1 + np.exp(-5.0)), abs=1e-9)


@pytest.mark.parametrize("n_shadows", [None, 3])
def test_lira_matches_reference_loops(n_shadows):
    data = make_data()
    targets = np.array([0, 4, 8])
    got = score_targets(create_attack("lira", n_shadows=n_shadows), data, targets, batch_size=2)
    want = reference_lira(data, targets, n_shadows)
    for name, expected in want.items():
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_few_shadows_fall_back_to_pooled_std_and_warn(caplog):
    data = make_data(n_models=4, n_samples=40, seed=3)
    data.keep[:, 0] = [True, False, False, False]  # sample 0: target 0 alone IN -> no IN shadow for target 0
    data.keep[:, 1] = [True, True, False, False]  # sample 1: a single IN shadow for targets 0 and 1
    targets = np.arange(4)
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        got = score_targets(create_attack("lira"), data, targets)
    want = reference_lira(data, targets)
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert np.isnan(got["lira_online"][0, 0]) and np.isfinite(got["lira_offline"][0, 0])
    assert "fewer than 2 IN shadows" in caplog.text and "no IN shadow" in caplog.text


def test_one_shadow_gives_no_variance_and_no_score():
    """With a single shadow no spread can be estimated: scores that need a std are NaN, not +-1e19."""
    data = make_data(n_models=6, n_samples=50, seed=4)
    got = score_targets(create_attack("lira", n_shadows=1), data, np.arange(6))
    for name in ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed"):
        assert np.isnan(got[name]).all(), name
    assert np.isfinite(got["global_threshold"]).all()


def test_population_samples_do_not_trigger_warnings(caplog):
    data = make_data(n_models=8, n_samples=40, seed=5)
    data.keep[:] = np.argsort(np.random.default_rng(0).random((8, 40)), axis=0) < 4  # 4 IN, 4 OUT per sample
    data.keep[:, :5] = False
    data.population = np.arange(5)
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        score_targets(create_attack("lira"), data, np.arange(8))
    assert "no IN shadow" not in caplog.text
