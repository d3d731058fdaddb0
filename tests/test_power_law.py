"""The power-law analysis: the weighted fit against independent formulas, the DP bound against known mechanisms, per-sample pieces, and a study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mia_lightning.analysis import power_law
from mia_lightning.analysis.dp_bound import compare, curve_epsilon, curve_epsilon_clopper_pearson, dp_tpr_bound, replace_one, resolved
from mia_lightning.analysis.power_fit import (
    exclusion, fit_power_law, interaction_test, leave_one_out_r_squared, predict, response_variance, sample_advantages,
)
from mia_lightning.analysis.power_law import member_means, nearest_neighbour_distances, spearman
from mia_lightning.cli import train_main
from mia_lightning.models.image import FeatureHead, autograd_gradient_norms

from test_images import clear_caches, image_recipe, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def synthetic_cells(b_s: float, b_c: float, b_0: float, noise: float = 0.0, seed: int = 0, width: float = 0.02, draws: int = 1) -> list[dict]:
    """Cells on the grid S x C x draws whose advantage TPR - FPR follows the power law (times lognormal noise), with bootstrap intervals of ``width``."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in (1, 2, 4, 8, 16, 32, 64):
        for c in (2, 5, 10):
            for d in range(draws):
                tpr = {str(x): float(x + 10 ** (b_s * np.log10(s) + b_c * np.log10(c) + b_0 + noise * rng.normal())) for x in power_law.FPR_LEVELS}
                ci = {k: [v - width / 2, v + width / 2] for k, v in tpr.items()}
                rows.append({"setting": f"S{s}_C{c}_d{d}", "shots": s, "n_classes": c, "tpr_at_fpr": tpr, "tpr_at_fpr_ci_bootstrap": ci,
                             "min_resolvable_fpr": 1e-5, "n_nonmembers": 10**5})
    return rows


def test_exact_power_law_in_the_advantage_is_recovered():
    fit = fit_power_law(synthetic_cells(-0.5, 0.3, -1.2), 0.01, replicates=200)
    assert fit["quantity"] == "log10(TPR - FPR)" and fit["n_settings"] == 21
    assert fit["coefficients"] == pytest.approx({"b_S": -0.5, "b_C": 0.3, "b_0": -1.2}, abs=1e-10)
    assert fit["r2_fit"] == pytest.approx(1.0) and fit["r2_leave_one_out"] == pytest.approx(1.0)
    assert all(v["b_S"] == pytest.approx(-0.5) for v in fit["per_class"].values()) and fit["interaction"]["coefficient"] == pytest.approx(0, abs=1e-9)
    log_tpr = fit_power_law(synthetic_cells(-0.5, 0.3, -1.2), 0.01, replicates=50, quantity="tpr")  # log TPR flattens towards log FPR: a shallower slope
    assert log_tpr["quantity"] == "log10 TPR" and log_tpr["coefficients"]["b_S"] > -0.5


def test_weighted_fit_equals_the_weighted_normal_equations():
    cells = synthetic_cells(-0.4, 0.5, -1.0, noise=0.1, seed=3, draws=2)
    for i, cell in enumerate(cells):  # unequal interval widths: the weights matter
        width = 0.002 * (1 + i % 5)
        cell["tpr_at_fpr_ci_bootstrap"] = {k: [v - width, v + width] for k, v in cell["tpr_at_fpr"].items()}
    fit = fit_power_law(cells, 0.1, replicates=500, seed=1)
    X = np.array([[math.log10(c["shots"]), math.log10(c["n_classes"]), 1.0] for c in cells])
    advantage = np.array([c["tpr_at_fpr"]["0.1"] - 0.1 for c in cells])
    y = np.log10(advantage)
    # delta method: se of log10(a) = se(a) / (a ln 10), se(a) = interval width / (2 x 1.96) (symmetric intervals here)
    variance = np.array([((c["tpr_at_fpr_ci_bootstrap"]["0.1"][1] - c["tpr_at_fpr_ci_bootstrap"]["0.1"][0]) / (2 * 1.959964) / (a * math.log(10))) ** 2
                         for c, a in zip(cells, advantage)])
    ols = np.linalg.solve(X.T @ X, X.T @ y)
    tau2 = max(0.0, ((y - X @ ols) ** 2).sum() / (len(y) - 3) - variance.mean())
    W = np.diag(1 / (variance + tau2))
    beta = np.linalg.solve(X.T @ W @ X, X.T @ W @ y)
    assert fit["between_cell_variance"] == pytest.approx(tau2, rel=1e-5) and tau2 > 0
    assert [fit["coefficients"][k] for k in ("b_S", "b_C", "b_0")] == pytest.approx(beta.tolist(), abs=1e-6)
    assert fit["r2_fit"] == pytest.approx(1 - ((y - X @ beta) ** 2).sum() / ((y - y.mean()) ** 2).sum(), abs=1e-6)
    assert leave_one_out_r_squared(X, y, np.diag(W)) == pytest.approx(fit["r2_leave_one_out"])
    low, high = fit["ci95_bootstrap"]["b_S"]
    assert low < -0.4 < high and high - low < 0.3


def test_a_clipped_interval_weighs_its_cell_by_the_unclipped_half_width():
    """The metrics write TPR +- 1.96 sd clipped to [0, 1]: the full width of a clipped interval would understate sd."""
    sd, tpr = 0.004, 0.005
    clipped = [max(0.0, tpr - 1.959964 * sd), tpr + 1.959964 * sd]
    expected = (sd / ((tpr - 0.001) * math.log(10))) ** 2
    assert response_variance(tpr, clipped, 0.001, "advantage") == pytest.approx(expected, rel=1e-6)
    assert response_variance(0.99, [0.99 - 1.959964 * 0.02, 1.0], 0.1, "tpr") == pytest.approx((0.02 / (0.99 * math.log(10))) ** 2, rel=1e-6)


def test_interaction_test_finds_a_slope_that_depends_on_c_and_not_one_that_does_not():
    rng = np.random.default_rng(0)
    shots = np.tile([1.0, 4, 16, 64, 256], 3)
    classes = np.repeat([2.0, 5, 10], 5)
    noise = 0.02 * rng.normal(size=15)
    flat = -0.5 * np.log10(shots) + 0.3 * np.log10(classes) - 1 + noise
    steep = flat + 0.4 * np.log10(shots) * np.log10(classes)
    assert interaction_test(shots, classes, steep, np.ones(15))["p_value"] < 1e-6
    assert interaction_test(shots, classes, flat, np.ones(15))["p_value"] > 0.01


def test_cells_unresolved_saturated_or_without_advantage_are_excluded_not_floored():
    cells = synthetic_cells(-0.5, 0.3, -1.2)
    cells[0]["min_resolvable_fpr"] = 0.01  # 100 non-member pairs cannot resolve FPR 0.001
    cells[1]["tpr_at_fpr"]["0.001"] = 0.001  # no advantage
    cells[2]["tpr_at_fpr"]["0.001"] = 0.97  # saturated
    fit = fit_power_law(cells, 0.001, replicates=50)
    assert fit["n_settings"] == len(cells) - 3
    assert [e["reason"].split(" ")[0] for e in fit["excluded"]] == ["scores", "TPR", "saturated"]
    assert fit["coefficients"]["b_S"] == pytest.approx(-0.5)


def test_prediction_of_another_scenario_against_hand_values():
    fit = {"coefficients": {"b_S": -0.5, "b_C": None, "b_0": -1.0}, "range": {"shots": [1, 16], "classes": [2, 2]}}
    cells = [{"setting": str(s), "shots": s, "n_classes": 2, "tpr_at_fpr": {"0.1": 0.1 + 10 ** (-0.5 * math.log10(s) - 1.0 + off)}, "min_resolvable_fpr": 0}
             for s, off in ((1, 0.1), (4, -0.1), (64, 0.3))]
    result = predict(fit, cells, 0.1)
    errors = np.array([-0.1, 0.1, -0.3])  # predicted - measured, in dex
    assert result["rmse"] == pytest.approx(np.sqrt((errors**2).mean())) and result["bias"] == pytest.approx(errors.mean())
    assert result["outside_fitted_range"] == 1 and result["n_cells"] == 3
    assert result["cells"] == ["1", "4", "64"] and np.allclose(np.subtract(result["predicted"], result["measured"]), errors)  # the plotted points


def test_per_sample_advantage_against_a_loop():
    """The loop drops unscored (NaN) pairs before anything else, as every metric does."""
    rng = np.random.default_rng(0)
    scores, members = rng.normal(size=(40, 30)), rng.random((40, 30)) < 0.5
    scores[members] += 1.0
    members[:, 0] = True  # no non-member target: not resolved
    scores[rng.random((40, 30)) < 0.15] = np.nan  # e.g. online LiRA where a sample had no IN shadow
    got = sample_advantages(scores, members, 0.1)
    for j in range(30):
        scored = np.isfinite(scores[:, j])
        out, inn = scores[~members[:, j] & scored, j], scores[members[:, j] & scored, j]
        if out.size < 10:
            assert np.isnan(got[j])
            continue
        threshold = np.sort(out)[::-1][int(np.floor(0.1 * out.size))]
        assert (out > threshold).mean() <= 0.1
        assert got[j] == pytest.approx((inn > threshold).mean() - (out > threshold).mean())


def test_dp_bound_matches_hand_values_and_randomised_response_sits_on_it():
    eps = np.log(2.0)
    # TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))
    assert dp_tpr_bound(np.array([0.2, 0.6]), eps, 0.1).tolist() == pytest.approx([0.5, 0.85])
    # randomised response with epsilon on 1,000 members / non-members: its ROC vertex lies exactly on the boundary
    q = 1 / (1 + np.exp(1.5))
    fpr, tpr = np.array([0.0, q, 1.0]), np.array([0.0, 1 - q, 1.0])
    assert curve_epsilon(fpr, tpr, 0.0, 1000, 1000) == pytest.approx(1.5, abs=0.01)
    assert (tpr <= dp_tpr_bound(fpr, 1.5, 0.0) + 1e-12).all() and (tpr[1] > dp_tpr_bound(fpr, 1.4, 0.0)[1])
    assert curve_epsilon_clopper_pearson(fpr, tpr, 0.0, 1000, 1000) < 1.5  # rates at their adverse 95% bounds: below the point estimate
    # with 100 non-members the vertex has 18 false positives (resolved); at FPR 2/1000 it has 2: not read
    assert resolved(np.array([0.18]), np.array([0.8]), 100, 100)[0].tolist() == [True]
    assert curve_epsilon(np.array([0, 0.002, 1]), np.array([0, 0.995, 1]), 0.0, 1000, 1000) == 0.0  # 2 false positives, 5 false negatives
    assert replace_one(1.0, 1e-5) == pytest.approx((2.0, (1 + math.e) * 1e-5))


def test_add_remove_epsilon_is_the_smallest_whose_replace_one_region_holds_the_curve():
    """An add/remove eps implies replace-one (2 eps, (1 + e^eps) delta): the smallest eps whose region contains the resolved vertices,
    checked with compare's own inequalities; half the replace-one eps at delta (the old figure) leaves room below it."""
    from mia_lightning.metrics import RocCurve

    curve = RocCurve(np.array([0.0, 0.01, 0.1, 1.0]), np.array([0.0, 0.05, 0.3, 1.0]), n_positives=1000, n_negatives=1000)
    delta = 0.01
    result = compare(curve, [(1.0, delta)])["curve_epsilon"][str(delta)]
    eps = result["add_remove_at_least"]
    inside = [compare(curve, [(e, delta)])["bounds"][0]["curve_inside"] for e in (eps + 1e-6, eps - 1e-3)]
    assert inside == [True, False]
    assert eps < result["replace_one"] / 2 - 0.01


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
    """The smoke study's structure (configs/images/fmnist_power_law_smoke.yaml: a fitted scenario and an unseen one) on tiny generated images:
    every setting an experiment, then the fit, the prediction of the unseen scenario, plots and per-sample correlations."""
    clear_caches()
    folder = write_image_folder(tmp_path / "images", n_classes=3, per_class=10)
    base = image_recipe(tmp_path, folder, **{"plan.n_models": 8, "data.init_args.shots": 1, "data.init_args.n_classes": 2, "data.init_args.queries": None,
                                             "trainer.max_epochs": 20, "farm.group_size": 8})
    smoke = yaml.safe_load((ROOT / "configs/images/fmnist_power_law_smoke.yaml").read_text())["study"]
    fitted, unseen = smoke["grid"]  # the real study's scenarios become generated ones: another backbone -> resnet10t, another dataset -> another resolution
    draws = {"data.init_args.shots": [1, 2, 4], "data.init_args.n_classes": [2, 3], "data.init_args.subset_seed": [0]}
    grid = [{**fitted, "data.init_args.backbone": ["resnet10t"], **draws},
            {**{k: v for k, v in unseen.items() if k != "data.init_args.source"}, "data.init_args.img_size": [24], **draws, "data.init_args.shots": [2, 4]}]
    largest = "backbone-resnet10t_shots-4_n_classes-3_subset_seed-0"
    study = {"study": {**smoke, "name": "pl", "root": str(tmp_path / "out"), "recipe": str(base), "grid": grid,
                       "analysis_params": {**smoke["analysis_params"], "bootstrap": 100, "roc_setting": largest, "per_sample_settings": [largest]}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    assert train_main(["study", "--config", str(tmp_path / "study.yaml")]) == 0
    out = tmp_path / "out" / "pl"
    analysis = json.loads((out / "analysis.json").read_text())
    scenarios = [s["scenario"] for s in analysis["settings"]]
    assert [(s["shots"], s["n_classes"]) for s in analysis["settings"]] == [(1, 2), (1, 3), (2, 2), (2, 3), (4, 2), (4, 3), (2, 2), (2, 3), (4, 2), (4, 3)]
    assert analysis["fit_scenario"] == scenarios[0] and scenarios[6:] == [f"resnet10t/{folder.name} img_size=24"] * 4
    assert json.loads((tmp_path / "out" / "pl" / "settings" / largest / "plan.json").read_text())["n_models"] == 16  # the study's overrides apply to every setting
    transfers = [t for t in analysis["transfer"] if t["scenario"] == scenarios[6]]
    assert len(transfers) == 3 and any(t["rmse"] is not None for t in transfers)
    for fit, transfer in zip(analysis["fits"], transfers):
        usable = [c for c in analysis["settings"][6:] if exclusion(c, fit["fpr"], "advantage") is None]
        assert transfer["n_cells"] == len(usable)
        if transfer["rmse"] is not None:  # RMSE and bias in dex by hand from the fitted coefficients
            b = fit["coefficients"]
            errors = [b["b_S"] * math.log10(c["shots"]) + b["b_C"] * math.log10(c["n_classes"]) + b["b_0"] - math.log10(c["tpr_at_fpr"][str(fit["fpr"])] - fit["fpr"]) for c in usable]
            assert transfer["rmse"] == pytest.approx(math.sqrt(np.mean(np.square(errors)))) and transfer["bias"] == pytest.approx(np.mean(errors))
    fit = analysis["fits"][2]  # FPR 0.1: every setting resolves it
    assert fit["fpr"] == 0.1 and fit["quantity"] == "log10(TPR - FPR)" and ("coefficients" in fit or "error" in fit)
    assert fit["n_settings"] + len(fit["excluded"]) == 6 and analysis["fits_log_tpr"][2]["quantity"] == "log10 TPR"
    assert [q["quantile"] for q in analysis["sample_quantiles"]] == [0.5, 0.9, 1.0]
    assert analysis["dp"]["adjacency"].startswith("few-shot plans are replace-one")
    plan = json.loads((out / "settings" / largest / "plan.json").read_text())
    assert plan["info"]["shots"] == 4 and plan["info"]["n_classes"] == 3 and plan["n_samples"] == 24
    per_sample = analysis["per_sample"][largest]
    assert per_sample["gradient_norm"]["n"] == 24 and 0 <= per_sample["gradient_norm"]["p_value"] <= 1
    assert analysis["dp"]["setting"] in {s["setting"] for s in analysis["settings"]}
    page = (out / "analysis.html").read_text()  # tables and plots of the analysis as one self-contained page
    assert "<script" not in page and page.count("data:image/png;base64,") == 4  # power law, predictions, DP bound, per sample
    assert all(f">{s['setting']}</td>" in page for s in analysis["settings"]) and "two-way bootstrap" in page
    twin = (out / "analysis.md").read_text()  # the same tables as Markdown
    assert all(f"| {s['setting']} |" in twin for s in analysis["settings"]) and twin.count("\n|---|") == page.count("<table")
    for name in ("power_law.png", "predictions.png", "dp_bound.png", "per_sample.png"):
        assert (out / name).stat().st_size > 1000
