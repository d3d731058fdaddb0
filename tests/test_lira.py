"""LiRA scores against a straightforward per-(target, sample, query) loop over the definitions of docs/attacks.md."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy.stats import norm
from synthetic import synthetic_attack_data

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.base import confidence_statistics
from mia_lightning.attacks.module import score_targets
from mia_lightning.attacks.shadows import ShadowMoments
from mia_lightning.metrics import rank_auc


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
    """The paper's Gaussian fits written as plain loops (docs/attacks.md 'LiRA')."""
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


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic phi in float64 [..., n, Q] from logits [..., n, Q, C]."""
    return confidence_statistics(logits, labels)[0]


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


@pytest.mark.parametrize("n_shadows", [None, 3])
def test_leave_out_moments_of_a_batch_equal_each_target_alone(n_shadows):
    """Targets that leave out the same model (a repeated target; with 3 shadows every target past model 3) share one computation."""
    data = make_data()
    moments = ShadowMoments(data.phi, data.keep, n_shadows)
    targets = np.array([7, 0, 4, 8, 5, 4])
    batch = moments.leave_out(targets)
    for row, target in enumerate(targets):
        for together, alone in zip(batch, moments.leave_out(np.array([target]))):
            np.testing.assert_array_equal(together[row], alone[0])


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


@pytest.mark.parametrize("variant", [{"mu": "median"}, {"fixed_std": "global"}])
def test_the_reference_variants_warn_where_one_shadow_leaves_no_std(caplog, variant):
    """They keep the reference's per-sample std (no pooled fallback): the pairs a lone IN shadow leaves unscored must be announced."""
    data = make_data(n_models=4, n_samples=40, seed=3)
    data.keep[:, 1] = [True, True, False, False]  # sample 1: a single IN shadow for targets 0 and 1
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        got = score_targets(create_attack("lira", **variant), data, np.arange(4))
    assert np.isnan(got["lira_online"][0, 1])
    assert "one IN shadow or zero spread" in caplog.text


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


def test_few_shadows_on_a_half_plan_bias_the_online_score_and_truncation_removes_it(caplog):
    """No signal, 8 models, every sample in exactly half: leave-one-out gives a member 3 IN / 4 OUT shadows and a
    non-member 4 / 3; the narrower fit of the smaller side pushes members down (AUC well below 0.5). Equal sides
    (``truncate``: 3 / 3 for everyone) give 0.5 up to noise, and the default run says so in a warning."""
    data = synthetic_attack_data(n_models=8, n_samples=2000, n_queries=1, n_classes=4, effect=0.0, seed=0)
    targets = np.arange(8)
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        default = score_targets(create_attack("lira"), data, targets)["lira_online"]
    assert "leave-one-out leaves the target's own side one shadow short" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        equal = score_targets(create_attack("lira", truncate=True), data, targets)["lira_online"]
    assert "one shadow short" not in caplog.text
    assert rank_auc(default, data.keep) < 0.46 and abs(rank_auc(equal, data.keep) - 0.5) < 0.02


def reference_code_scores(data: AttackData, targets) -> dict[str, np.ndarray]:
    """The public reference implementation's choices (tensorflow/privacy mi_lira_2021), written out as loops.

    Per target: shadows = every other model; each sample keeps its first k IN (OUT) shadows by model
    id, k the smallest IN (OUT) count over samples; mu = per-sample median; per-sample std (ddof 0);
    fixed variance = one std over all kept IN values (both online Gaussians) or all kept OUT values
    (offline); offline score = -log N(phi; mu_out, sd_out) (two-sided).
    """
    M, n, Q, _ = data.logits.shape
    phi = np.array([[[phi_loop(data.logits[m, j, a], data.labels[j]) for a in range(Q)] for j in range(n)] for m in range(M)])
    names = ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold")
    out = {name: np.full((len(targets), n), np.nan) for name in names}
    for row, t in enumerate(targets):
        shadows = [m for m in range(M) if m != t]
        dat_in = [[m for m in shadows if data.keep[m, j]] for j in range(n)]
        dat_out = [[m for m in shadows if not data.keep[m, j]] for j in range(n)]
        k_in, k_out = min(map(len, dat_in)), min(map(len, dat_out))
        vin = np.array([phi[ms[:k_in], j] for j, ms in enumerate(dat_in)])  # [n, k_in, Q]
        vout = np.array([phi[ms[:k_out], j] for j, ms in enumerate(dat_out)])
        mu_in, mu_out = np.median(vin, 1), np.median(vout, 1)
        sd_in, sd_out = np.std(vin, 1), np.std(vout, 1)
        fixed_in, fixed_out = np.std(vin), np.std(vout)
        x = phi[t]
        out["lira_online"][row] = (norm.logpdf(x, mu_in, sd_in) - norm.logpdf(x, mu_out, sd_out)).mean(1)
        out["lira_online_fixed"][row] = (norm.logpdf(x, mu_in, fixed_in) - norm.logpdf(x, mu_out, fixed_in)).mean(1)
        out["lira_offline"][row] = (-norm.logpdf(x, mu_out, sd_out)).mean(1)
        out["lira_offline_fixed"][row] = (-norm.logpdf(x, mu_out, fixed_out)).mean(1)
        out["global_threshold"][row] = x.mean(1)
    return out


def test_reference_implementation_choices_reproduce_its_scores():
    data = make_data(n_models=10, n_samples=25, n_queries=2, seed=6)
    targets = np.array([0, 3, 9])
    attack = create_attack("lira", mu="median", offline="two_sided", fixed_std="global", truncate=True)
    got = score_targets(attack, data, targets, batch_size=2)
    want = reference_code_scores(data, targets)
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-9, atol=1e-9, err_msg=name)
    assert attack.params() == {"n_shadows": None, "mu": "median", "offline": "two_sided", "fixed_std": "global", "truncate": True}


@pytest.mark.parametrize("options", [{"mu": "median"}, {"truncate": True}, {"offline": "two_sided"}])
def test_each_reference_choice_changes_the_scores_alone(options):
    """One switch at a time: the per-target reference path agrees with the default fit where the switch does not apply."""
    data = make_data(n_models=9, n_samples=20, seed=8)
    targets = np.arange(9)
    default = score_targets(create_attack("lira"), data, targets)
    switched = score_targets(create_attack("lira", **options), data, targets)
    assert np.array_equal(default["global_threshold"], switched["global_threshold"])
    changed = [name for name in default if not np.allclose(default[name], switched[name], equal_nan=True)]
    expected = {"mu": ["lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed"],
                "truncate": ["lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed"],
                "offline": ["lira_offline", "lira_offline_fixed"]}[next(iter(options))]
    assert changed == expected


def test_bad_reference_choice_is_one_line():
    from mia_lightning.errors import MiaError

    with pytest.raises(MiaError, match="lira.mu='mode': choose one of mean, median"):
        create_attack("lira", mu="mode")


def test_reference_models_of_the_plan_are_not_shadows(tmp_path):
    """Models a plan trained on other data (plan.json info.reference_models, the last ids) stay out of every shadow pool."""
    import json

    from synthetic import write_synthetic_experiment

    from mia_lightning.contract.experiment import ExperimentDir

    root = write_synthetic_experiment(tmp_path / "exp", n_models=7, n_samples=30, seed=2)
    keep = np.load(root / "keep.npy")
    keep[6] = False  # the reference model trained on public data: never IN
    np.save(root / "keep.npy", keep)
    (root / "plan.json").write_text(json.dumps({"version": 2, "info": {"reference_models": [6], "target_models": [0, 1, 2, 3, 4, 5]}}))
    data = AttackData.from_experiment(ExperimentDir(root))
    assert data.shadow_candidates == 6
    without = AttackData(keep=keep[:6], labels=data.labels, logits=data.logits[:6])
    for family in ("lira", "rmia", "reference"):
        got = score_targets(create_attack(family), data, np.arange(6))
        want = score_targets(create_attack(family), without, np.arange(6))
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, err_msg=name)
    as_target = score_targets(create_attack("lira"), data, np.array([6]))  # a reference as target: every candidate is its shadow
    assert np.isfinite(as_target["lira_offline"]).all()


def test_identical_in_values_have_zero_variance_not_rounding_noise():
    """IN shadows that agree exactly (a saturated or quantised statistic) have variance 0, so the documented pooled-std fallback applies;
    the shifted sums used to leave ~1e-15 of rounding noise there, a std of ~3e-8 and scores of ~1e16."""
    rng = np.random.default_rng(0)
    member = rng.random((10, 2000)) < 0.5
    values = np.where(member, 0.1 * rng.integers(1, 50, size=(1, 2000)), rng.normal(size=(10, 2000)))[..., None]  # IN: one value per sample
    count, _, var, _ = ShadowMoments(values, member).leave_out(np.arange(10))
    assert (var[count >= 2] == 0).all()
