"""The power-law analysis: the fit against independent formulas, the DP bound against known mechanisms, per-sample pieces, and a study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mia_lightning.analysis import power_law
from mia_lightning.analysis.power_law import (
    curve_epsilon, dp_tpr_bound, fit_power_law, leave_one_out_r_squared, member_means, nearest_neighbour_distances, spearman,
)
from mia_lightning.cli import train_main
from mia_lightning.models.image import FeatureHead, autograd_gradient_norms

from test_images import clear_caches, write_image_folder


def synthetic_settings(b_s: float, b_c: float, b_0: float, noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Settings on the grid S x C whose TPRs follow the power law (times lognormal noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in (1, 2, 4, 8, 16, 32, 64):
        for c in (2, 5, 10):
            tpr = {str(level): float(10 ** (b_s * np.log10(s) + b_c * np.log10(c) + b_0 + noise * rng.normal())) for level in power_law.FPR_LEVELS}
            rows.append({"setting": f"S{s}_C{c}", "shots": s, "n_classes": c, "tpr_at_fpr": tpr, "min_resolvable_fpr": 1e-5, "n_nonmembers": 10**5})
    return rows


def test_exact_power_law_is_recovered_with_perfect_r_squared():
    fit = fit_power_law(synthetic_settings(-0.5, 0.3, -1.2), 0.01, replicates=200)
    assert fit["coefficients"] == pytest.approx({"b_S": -0.5, "b_C": 0.3, "b_0": -1.2}, abs=1e-10)
    assert fit["r2_fit"] == pytest.approx(1.0) and fit["r2_leave_one_out"] == pytest.approx(1.0)
    assert fit["r2_held_out"]["classes"] == [10] and fit["r2_held_out"]["value"] == pytest.approx(1.0)


def test_noisy_fit_equals_the_normal_equations_and_its_interval_covers_the_truth():
    settings = synthetic_settings(-0.4, 0.5, -1.0, noise=0.1, seed=3)
    fit = fit_power_law(settings, 0.1, replicates=1000, seed=1)
    X = np.array([[np.log10(s["shots"]), np.log10(s["n_classes"]), 1.0] for s in settings])
    y = np.log10([s["tpr_at_fpr"]["0.1"] for s in settings])
    beta = np.linalg.solve(X.T @ X, X.T @ y)
    assert [fit["coefficients"][k] for k in ("b_S", "b_C", "b_0")] == pytest.approx(beta.tolist(), abs=1e-10)
    residual = y - X @ beta
    assert fit["r2_fit"] == pytest.approx(1 - residual @ residual / ((y - y.mean()) @ (y - y.mean())))
    loo = [X[i] @ np.linalg.solve(np.delete(X, i, 0).T @ np.delete(X, i, 0), np.delete(X, i, 0).T @ np.delete(y, i)) for i in range(len(y))]
    assert fit["r2_leave_one_out"] == pytest.approx(1 - ((y - loo) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert leave_one_out_r_squared(X, y) < fit["r2_fit"]
    low, high = fit["ci95_bootstrap"]["b_S"]
    assert low < -0.4 < high and high - low < 0.3


def test_settings_the_scores_cannot_resolve_or_with_zero_tpr_are_excluded_not_floored():
    settings = synthetic_settings(-0.5, 0.3, -1.2)
    settings[0]["min_resolvable_fpr"] = 0.01  # 100 non-member pairs cannot resolve FPR 0.001
    settings[1]["tpr_at_fpr"]["0.001"] = 0.0
    fit = fit_power_law(settings, 0.001, replicates=50)
    assert fit["n_settings"] == len(settings) - 2
    assert [e["setting"] for e in fit["excluded"]] == [settings[0]["setting"], settings[1]["setting"]]
    assert fit["coefficients"]["b_S"] == pytest.approx(-0.5)


def test_dp_bound_matches_hand_values_and_randomised_response_sits_on_it():
    eps = np.log(2.0)
    # TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))
    assert dp_tpr_bound(np.array([0.2, 0.6]), eps, 0.1).tolist() == pytest.approx([0.5, 0.85])
    # randomised response with epsilon: its ROC vertex (1 / (1 + e^eps), e^eps / (1 + e^eps)) lies exactly on the boundary
    q = 1 / (1 + np.exp(1.5))
    fpr, tpr = np.array([0.0, q, 1.0]), np.array([0.0, 1 - q, 1.0])
    assert curve_epsilon(fpr, tpr, 0.0) == pytest.approx(1.5)
    assert (tpr <= dp_tpr_bound(fpr, 1.5, 0.0) + 1e-12).all() and (tpr[1] > dp_tpr_bound(fpr, 1.4, 0.0)[1])


def test_per_sample_helpers_against_loops():
    values = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0], [5.0, 6.0, 7.0]])
    members = np.array([[True, False, True], [True, True, False], [False, False, False]])
    np.testing.assert_allclose(member_means(values, members), [2.0, 4.0, np.nan])  # NaN scores and no member: left out
    x = np.random.default_rng(0).normal(size=(30, 5))
    brute = [min(np.linalg.norm(x[i] - x[j]) for j in range(30) if j != i) for i in range(30)]
    np.testing.assert_allclose(nearest_neighbour_distances(x), brute, rtol=1e-9)
    monotone = spearman(np.arange(10.0), np.exp(np.arange(10.0)))
    assert monotone["rho"] == pytest.approx(1.0) and monotone["p_value"] < 1e-6


def test_linear_head_gradient_norm_closed_form_equals_autograd():
    torch.manual_seed(0)
    head = FeatureHead(n_features=6, n_classes=4, hidden=[])
    head.fit_standardizer(torch.randn(6), torch.rand(6) + 0.5)

    class Pool:
        features = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
        labels = np.random.default_rng(2).integers(0, 4, 20)

        def pool_features(self):
            return self.features

        def pool_labels(self):
            return self.labels

        def pool_dataloader(self):
            return [(torch.from_numpy(self.features), torch.from_numpy(self.labels))]

    closed = head.per_sample_gradient_norms(Pool())
    np.testing.assert_allclose(closed, autograd_gradient_norms(head, list(head.parameters()), Pool().pool_dataloader()), rtol=1e-5)


def test_study_end_to_end_on_generated_images(tmp_path):
    """train.py study over S x C on tiny generated images: every setting an experiment, then the fit, plots and per-sample correlations."""
    clear_caches()
    folder = write_image_folder(tmp_path / "images", n_classes=3, per_class=10)
    recipe = {
        "experiment": {"name": "base", "root": str(tmp_path / "out")},
        "plan": {"n_models": 8, "seed": 0, "kind": "few_shot"},
        "data": {"class_path": "mia_lightning.data.images.ImageFeatureDataModule",
                 "init_args": {"source": str(folder), "shots": 1, "n_classes": 2, "backbone": "resnet10t", "weights": "random", "img_size": 16, "batch_size": 64}},
        "model": {"class_path": "mia_lightning.models.image.FeatureHead", "init_args": {"hidden": [], "lr": 0.05}},
        "trainer": {"max_epochs": 20, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "farm": {"engine": "vectorised", "group_size": 8},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(recipe))
    study = {"study": {"name": "pl", "root": str(tmp_path / "out"), "recipe": str(tmp_path / "base.yaml"),
                       "grid": {"data.init_args.shots": [1, 2, 4], "data.init_args.n_classes": [2, 3]}, "attacks": ["lira"],
                       "analysis": "power_law", "analysis_params": {"bootstrap": 100, "held_out_classes": [3]}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    assert train_main(["study", "--config", str(tmp_path / "study.yaml")]) == 0
    out = tmp_path / "out" / "pl"
    analysis = json.loads((out / "analysis.json").read_text())
    assert [(s["shots"], s["n_classes"]) for s in analysis["settings"]] == [(1, 2), (1, 3), (2, 2), (2, 3), (4, 2), (4, 3)]
    fit = analysis["fits"][2]  # FPR 0.1: every setting resolves it
    assert fit["fpr"] == 0.1 and set(fit["coefficients"]) == {"b_S", "b_C", "b_0"} and "r2_leave_one_out" in fit
    assert fit["r2_held_out"]["value"] is None and "fewer than two class counts" in fit["r2_held_out"]["reason"]  # only C = 2 would remain
    plan = json.loads((out / "settings" / "shots-4_n_classes-3" / "plan.json").read_text())
    assert plan["info"]["shots"] == 4 and plan["info"]["n_classes"] == 3 and plan["n_samples"] == 24
    per_sample = analysis["per_sample"]["shots-4_n_classes-3"]
    assert per_sample["gradient_norm"]["n"] == 24 and 0 <= per_sample["gradient_norm"]["p_value"] <= 1
    assert analysis["dp"]["setting"] in {s["setting"] for s in analysis["settings"]}
    page = (out / "analysis.html").read_text()  # tables and plots of the analysis as one self-contained page
    assert "<script" not in page and page.count("data:image/png;base64,") == 3
    assert all(f">{s['setting']}</td>" in page for s in analysis["settings"]) and "two-way bootstrap" in page
    for name in ("power_law.png", "dp_bound.png", "per_sample.png"):
        assert (out / name).stat().st_size > 1000
