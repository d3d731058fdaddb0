"""Quantile-regression MIA (Bertran et al. 2023): pinball loss, the regressor against known quantiles and an exact LP solver,
the conformal shift and its FPR range, the FPR check, and the attack end to end from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.attacks.quantile import conformal_fpr_interval, conformal_shift, fpr_control
from mia_lightning.attacks.quantile_regressor import fit_quantile_regressors, pinball_loss
from mia_lightning.cli import attack_main, train_main

ROOT = Path(__file__).resolve().parents[1]


def test_pinball_loss_hand_computed():
    predicted = torch.tensor([1.0, 1.0, 1.0])
    observed = torch.tensor([3.0, 1.0, -1.0])
    # tau = 0.9: residual 2 -> 0.9 * 2; residual 0 -> 0; residual -2 -> 0.1 * 2
    assert torch.allclose(pinball_loss(predicted, observed, 0.9), torch.tensor([1.8, 0.0, 0.2]))


def test_conformal_shift_hand_computed():
    residuals = np.array([[9.0, 1, 8, 2, 7, 3, 6, 4, 5], [0.0, 0, 0, 0, 0, 0, 0, 0, 1]])
    # m = 9, alpha = 0.2: rank ceil(10 * 0.8) = 8 -> the 8th smallest
    assert conformal_shift(residuals, 0.2).tolist() == [8.0, 0.0]
    # alpha = 0.01: rank ceil(10 * 0.99) = 10 > m -> the largest
    assert conformal_shift(residuals, 0.01).tolist() == [9.0, 1.0]


def test_conformal_fpr_interval_matches_simulation():
    """The exceedance probability of a fresh uniform over the shifted quantile of m uniforms, simulated."""
    rng = np.random.default_rng(0)
    m, alpha = 99, 0.1
    rank = int(np.ceil((m + 1) * (1 - alpha)))
    exceed = 1.0 - np.sort(rng.random((20000, m)), axis=1)[:, rank - 1]
    low, high = conformal_fpr_interval(m, alpha)
    assert abs(low - np.quantile(exceed, 0.025)) < 0.005 and abs(high - np.quantile(exceed, 0.975)) < 0.005
    assert exceed.mean() <= alpha + 0.002
    assert conformal_fpr_interval(0, 0.05) == [0.05, 0.05]


def test_too_few_calibration_samples_realise_more_than_alpha_and_the_interval_says_so():
    """m = 9 < 1/alpha - 1: the rank ceil(10 * 0.99) = 10 > m falls back to the largest residual, whose exceedance is Beta(1, m),
    mean 1 / (m + 1) = 0.1, ten times alpha (docs/attacks.md, quantile regression)."""
    from scipy.stats import beta

    low, high = conformal_fpr_interval(9, 0.01)
    assert [low, high] == pytest.approx([beta.ppf(0.025, 1, 9), beta.ppf(0.975, 1, 9)])
    assert low < 0.01 < 0.1 < high


def heteroscedastic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x ~ U(-1, 1)^2, s = x0 + (0.3 + |x1|) eps with eps ~ N(0, 1): its 0.9-quantile is x0 + (0.3 + |x1|) z_0.9."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 2))
    scale = 0.3 + np.abs(x[:, 1])
    s = x[:, :1] + scale[:, None] * rng.normal(size=(n, 2))  # two independent targets sharing the inputs
    return x.astype(np.float32), s, x[:, 0] + scale * norm.ppf(0.9)


def test_regressors_recover_a_known_conditional_quantile():
    x, s, truth = heteroscedastic(3000, 0)
    module = fit_quantile_regressors(x, s, 0.9, hidden=32, epochs=60, batch_size=256, lr=1e-2, weight_decay=0.0)
    x_new, s_new, truth_new = heteroscedastic(4000, 1)
    with torch.no_grad():
        predicted = module(torch.from_numpy(x_new)).double().numpy()  # [2, n]
    assert np.abs(predicted - truth_new).mean() < 0.12, np.abs(predicted - truth_new).mean(axis=1)
    exceed = (s_new.T > predicted).mean(axis=1)
    assert np.all(np.abs(exceed - 0.1) < 0.025), exceed
    constant = np.quantile(s, 0.9, axis=0)[:, None]  # the global-threshold attack's quantile: no per-sample information
    assert np.abs(constant - truth_new).mean() > 2 * np.abs(predicted - truth_new).mean()


def test_linear_regressor_matches_an_exact_linear_programme():
    """hidden=0 is linear quantile regression; scikit-learn's QuantileRegressor solves the same problem exactly (HiGHS)."""
    from sklearn.linear_model import QuantileRegressor

    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 3)).astype(np.float32)
    s = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + rng.standard_t(3, 600))[:, None]
    module = fit_quantile_regressors(x, s, 0.8, hidden=0, epochs=300, batch_size=600, lr=5e-2, weight_decay=0.0)
    exact = QuantileRegressor(quantile=0.8, alpha=0.0, solver="highs").fit(x, s[:, 0])
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).double().numpy()[0]
    theirs = exact.predict(x)
    assert np.abs(ours - theirs).max() < 0.1

    def loss(q):
        return pinball_loss(torch.from_numpy(q), torch.from_numpy(s[:, 0]), 0.8).mean().item()

    assert loss(ours) <= loss(theirs) * 1.005


def test_fpr_control_hand_computed():
    scores = np.array([[1.0, -1.0, 2.0, np.nan], [-0.5, 0.5, -2.0, 3.0]])
    members = np.array([[True, False, False, True], [True, False, False, True]])
    record = fpr_control(scores, members, alpha=0.5, alpha_interval=[0.4, 0.6], replicates=0)
    # non-members: (0, 1) -1, (0, 2) 2 flagged, (1, 1) 0.5 flagged, (1, 2) -2 -> FPR 2/4; members scored: 1, -0.5, 3 -> TPR 2/3
    assert record["fpr"] == 0.5 and record["tpr"] == pytest.approx(2 / 3)
    assert record["n_nonmembers"] == 4 and record["n_members"] == 3
    assert record["fpr_consistent"] is None and "fpr_ci_bootstrap" not in record  # no bootstrap: the pairs' interval decides nothing
    judged = fpr_control(scores, members, alpha=0.5, alpha_interval=[0.4, 0.6], replicates=200)
    low, high = judged["fpr_ci_bootstrap"]
    assert low <= 0.5 <= high and judged["fpr_consistent"]
    assert fpr_control(scores, members, alpha=0.01, alpha_interval=[0.001, 0.02], replicates=200)["fpr_consistent"] is (low <= 0.02)


def test_fpr_control_resamples_users_when_their_samples_are_correlated():
    """A user's 10 samples are all flagged or all not: resampling samples treats them as 10 independent draws
    (an interval ~sqrt(10) too narrow); with ``groups`` the interval is over users, like the metrics' intervals."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(60), 10)
    flagged_user = rng.random(60) < 0.2
    scores = np.where(flagged_user[users], 1.0, -1.0)[None, :].repeat(8, axis=0)
    members = (users >= 50)[None, :].repeat(8, axis=0)  # users 50-59 are members; 50 non-member users decide the FPR
    by_sample = fpr_control(scores, members, alpha=0.2, alpha_interval=[0.15, 0.25], replicates=400)
    by_user = fpr_control(scores, members, alpha=0.2, alpha_interval=[0.15, 0.25], replicates=400, groups=users)
    share = flagged_user[:50].mean()
    assert by_user["fpr"] == by_sample["fpr"] == share
    width = {name: record["fpr_ci_bootstrap"][1] - record["fpr_ci_bootstrap"][0] for name, record in (("sample", by_sample), ("user", by_user))}
    assert 2.5 < width["user"] / width["sample"] < 4.5  # sqrt(10) = 3.16
    sd = np.sqrt(share * (1 - share) / 50)  # the binomial sd of a share of 50 independent users
    assert width["user"] / (2 * 1.959964) == pytest.approx(sd, rel=0.25)
    np.testing.assert_array_equal(fpr_control(scores, members, 0.2, [0.15, 0.25], 400, groups=np.arange(600))["fpr_ci_bootstrap"],
                                  by_sample["fpr_ci_bootstrap"])  # one user per sample is the sample bootstrap


def test_fpr_control_line_never_labels_the_pairs_interval_as_the_bootstrap():
    from mia_lightning.report.terminal import fpr_control_lines

    scores = np.array([[1.0, -1.0, 2.0, np.nan], [-0.5, 0.5, -2.0, 3.0]])
    members = np.array([[True, False, False, True], [True, False, False, True]])
    control = fpr_control(scores, members, alpha=0.5, alpha_interval=[0.4, 0.6], replicates=0)
    (line,) = fpr_control_lines([{"attack": "quantile_regression", "fpr_control": control}])
    assert "{" not in line and "not judged without bootstrap intervals" in line


def feature_data(n_models: int = 6, n: int = 1200, n_population: int = 600, seed: int = 0) -> AttackData:
    """Logits whose true-class margin depends on the inputs (easy samples are confident) plus a membership boost."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 3))
    labels = rng.integers(0, 3, n)
    keep = np.zeros((n_models, n), dtype=bool)
    keep[:, : n - n_population] = rng.random((n_models, n - n_population)) < 0.5
    margin = 2.0 * features[:, 0] + rng.normal(0, 0.5, (n_models, n)) + 1.5 * keep
    logits = np.zeros((n_models, n, 1, 3))
    logits[:, np.arange(n), 0, labels] = margin
    return AttackData(keep=keep, labels=labels, logits=logits.astype(np.float32), population=np.arange(n - n_population, n), features=features)


def test_attack_uses_the_inputs_and_controls_its_fpr():
    data = feature_data()
    targets = np.arange(data.n_models)
    attack = create_attack("quantile", alpha=0.1, epochs=40)
    scores = score_targets(attack, data, targets)["quantile_regression"]
    audited = data.audit_pairs(targets)
    members = data.keep[targets]
    record = attack.decision_record("quantile_regression", np.where(audited, scores, np.nan), members, 100)["fpr_control"]
    assert record["fpr_consistent"], record
    # the margin depends on feature 0: a constant threshold (the global-threshold attack at the same FPR) recalls far less
    phi = data.phi[targets, :, 0]
    constant = np.quantile(phi[:, data.population], 0.9, axis=1, keepdims=True)
    constant_tpr = (phi > constant)[members & audited].mean()
    assert record["tpr"] > 2 * constant_tpr, (record["tpr"], constant_tpr)


def test_attack_needs_features_and_a_population():
    data = feature_data()
    data.population = None
    assert "population.npy" in create_attack("quantile").unmet_requirement(data)
    data = feature_data()
    data.features = None
    assert "input features" in create_attack("quantile").unmet_requirement(data)


@pytest.fixture(scope="module")
def tiny_farm(tmp_path_factory) -> Path:
    """8 digits MLPs with 400 public samples no model trains on."""
    root = tmp_path_factory.mktemp("quantile")
    assert train_main(["farm", "--config", str(ROOT / "configs/tabular/digits_quickstart.yaml"), "--experiment.root", str(root),
                       "--experiment.name", "tiny", "--plan.n_models", "8", "--plan.n_population", "400", "--trainer.max_epochs", "10",
                       "--trainer.enable_progress_bar", "false"]) == 0
    return root / "tiny"


def test_cli_writes_scores_and_the_fpr_check(tiny_farm, capsys):
    assert attack_main(["--experiment", str(tiny_farm), "--attack", "quantile", "--params", '{"quantile": {"alpha": 0.1, "epochs": 20}}']) == 0
    out = capsys.readouterr().out
    assert "quantile_regression: built for FPR 10.00%" in out
    folder = tiny_farm / "attacks" / "quantile_regression"
    record = json.loads((folder / "results.json").read_text())
    scores = np.load(folder / "scores.npy")
    keep = np.load(tiny_farm / "keep.npy")
    population = np.load(tiny_farm / "population.npy")
    audited = np.ones(keep.shape[1], dtype=bool)
    audited[population] = False
    non = ~keep[:, audited]
    control = record["fpr_control"]
    assert control["fpr"] == pytest.approx((scores[:, audited] > 0)[non].mean())
    assert control["alpha_interval"] == pytest.approx(conformal_fpr_interval(200, 0.1))
    assert record["params"]["public_samples"] == 400 and record["n_members"] + record["n_nonmembers"] == 8 * 1397


def test_cli_skips_it_without_a_population(tmp_path, capsys):
    from tests.synthetic import write_synthetic_experiment

    experiment = write_synthetic_experiment(tmp_path / "exp")
    assert attack_main(["--experiment", str(experiment), "--attack", "quantile", "thresholds"]) == 0
    skipped = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped quantile"))
    assert "population.npy" in skipped
