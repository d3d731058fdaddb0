"""The power-law study: MIA vulnerability against shots per class S and classes C, per-sample vulnerability, and the DP bound.

Tobaben et al., "Impact of Dataset Properties on Membership Inference Vulnerability of Deep Transfer
Learning" (NeurIPS 2025; arXiv 2402.06674): for fine-tuned pretrained models the attacker's advantage
at a fixed FPR, log10(TPR - FPR), falls linearly in log10 S (theory: slope -1/2). Over the cells of a
study (``train.py study ... analysis: power_law``; a cell is one S, C, class subset and data draw,
and, with several scenarios, one backbone / dataset) this module

1. fits log10(TPR@x - x) = b_S log10 S + b_C log10 C + b_0 (headline) and log10 TPR@x (secondary)
   for each FPR level x on the cells of the fitted scenario, weighted by the two-way bootstrap
   intervals the attack wrote, with per-C slopes and an S x C interaction test
   (``analysis.power_fit``); b_C is descriptive: C is confounded with which classes are drawn;
2. predicts every other scenario (another backbone or dataset) with that fit: RMSE and bias in dex
   and R^2, the paper's validation on unseen fine-tuning scenarios;
3. fits the quantiles (median, 90%, most vulnerable) of the per-sample advantages the same way;
4. plots TPR vs S (log-log) per C with bootstrap intervals and the fitted lines (``power_law.png``);
5. per sample (Tobaben et al. Sec. 5): Spearman correlation of each sample's LiRA member score with
   its end-of-training gradient norm and its nearest-neighbour distance in feature space;
6. compares a measured ROC with (eps, delta)-DP regions at the vertices the scores resolve, under
   the plan's replace-one adjacency (``analysis.dp_bound``; ``dp_bound.png``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml

from mia_lightning.analysis.dp_bound import bound_curves, bound_text, compare
from mia_lightning.analysis.power_fit import fit_power_law, fit_sample_quantiles, predict, sample_advantages
from mia_lightning.console import console
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json
from mia_lightning.report.cells import tpr_cell
from mia_lightning.contract.confine import confined, confined_all
from mia_lightning.report.html import ANALYSIS_PAGE, write_tables_page
from mia_lightning.report.figures import plot_dp_bound, plot_per_sample, plot_power_law, plot_predictions
from mia_lightning.report.table import TableRecord
from mia_lightning.report.terminal import print_tables

log = logging.getLogger("mia_lightning")

FPR_LEVELS: tuple[float, ...] = (0.001, 0.01, 0.1)
DEFAULT_DP_BOUNDS: tuple[tuple[float, float], ...] = ((1.0, 1e-5), (4.0, 1e-5), (8.0, 1e-5))
SAMPLE_QUANTILES: tuple[float, ...] = (0.5, 0.9, 1.0)
"""Quantiles of the per-sample advantages whose slopes are fitted: median, 90%, the most vulnerable sample."""


# ------------------------------------------------------------------------------------- study settings


DRAW_KEYS = ("shots", "n_classes", "subset_seed", "seed")
"""Override leaves that make a cell within a scenario (S, C and the draw); any other override names a scenario."""


def scenario_name(experiment: ExperimentDir, overrides: dict) -> str:
    """'mobilenetv2_100/fashion_mnist' (backbone / source of the experiment's recipe: a local folder by its name), plus any override that is not a draw key."""
    config = yaml.safe_load(experiment.config_path.read_text()) if experiment.config_path.is_file() else {}
    data = ((config or {}).get("data") or {}).get("init_args") or {}
    extra = [f"{key}={value}" for key, value in overrides.items() if key not in (*DRAW_KEYS, "backbone", "source")]
    source = str(data.get("source", "?")).rstrip("/").rsplit("/", 1)[-1]  # data/source/images (the experiment's copy) -> images
    return " ".join([f"{data.get('backbone', '?')}/{source}", *extra])


def _setting_summary(row: dict, attack: str) -> dict:
    """S, C, draw, scenario, the attack's TPRs with their intervals, and utility of one audited setting."""
    experiment = ExperimentDir(Path(row["experiment"]))
    info = experiment.plan.get("info", {})
    overrides = {key.rsplit(".", 1)[-1]: value for key, value in (row.get("overrides") or {}).items()}
    shots, classes = info.get("shots", overrides.get("shots")), info.get("n_classes", overrides.get("n_classes"))
    if shots is None or classes is None:
        raise MiaError(f"{experiment.root}: no shots / n_classes in plan.json (plan.kind few_shot records them); the power-law analysis needs few-shot settings")
    results = row["results"].get(attack)
    if results is None:
        raise MiaError(f"study setting {row['setting']!r}: no {attack!r} results (outputs: {', '.join(sorted(row['results']))}); set analysis_params.attack or add its attack to study.attacks")
    accuracies = []
    for done in sorted(experiment.models_dir.glob("*/done.json")):
        value = load_json(done).get("metrics", {}).get("val_acc")
        if value is not None:
            accuracies.append(float(value))
    return {"setting": row["setting"], "experiment": str(experiment.root), "run_folder": str(row["run_folder"]), "shots": int(shots), "n_classes": int(classes),
            "scenario": scenario_name(experiment, overrides),
            "auc": results["auc"], "tpr_at_fpr": results["tpr_at_fpr"], "tpr_at_fpr_ci": results["tpr_at_fpr_ci"],
            "tpr_at_fpr_ci_bootstrap": results.get("tpr_at_fpr_ci_bootstrap") or {},
            "min_resolvable_fpr": results.get("min_resolvable_fpr", 0.0), "n_members": results["n_members"], "n_nonmembers": results["n_nonmembers"],
            "val_acc": float(np.mean(accuracies)) if accuracies else None}


def attack_scores(experiment: ExperimentDir, folder: Path, output: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [T, n], members bool [T, n], target ids) of ``output`` in the experiment's attack run ``folder`` (the study's run of the setting).

    Read through the run's checked files (``contract.runs``): a damaged results.json or scores.npy is one line naming it.
    """
    from mia_lightning.contract.runs import output_scores, read_run_file, run_results, setting_fix

    fix = setting_fix(experiment)
    results = run_results(folder, read_run_file(folder, fix), fix=fix)
    if output not in results:
        raise MiaError(f"{Path(folder) / 'run.json'}: no output {output!r} (it has {', '.join(results) or 'none'}); {fix} with that attack")
    scores, members = output_scores(folder, results[output], experiment.keep, fix)
    return scores, members, np.asarray(results[output]["targets"], dtype=np.int64)


# ---------------------------------------------------------------------------------------- per sample


def member_means(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """float64 [n]: mean of values[t, j] over the targets t that trained on sample j (finite values only; NaN if none)."""
    use = members & np.isfinite(values)
    counts = use.sum(axis=0)
    totals = np.where(use, values, 0.0).sum(axis=0)
    return np.divide(totals, counts, out=np.full(values.shape[1], np.nan), where=counts > 0)


def nearest_neighbour_distances(features: np.ndarray) -> np.ndarray:
    """float64 [n]: Euclidean distance from each row to the closest other row."""
    x = np.asarray(features, dtype=np.float64)
    squared = (x**2).sum(1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0)
    np.fill_diagonal(distances, np.inf)
    return np.sqrt(distances.min(axis=1))


def spearman(a: np.ndarray, b: np.ndarray) -> dict:
    """Spearman's rho with its two-sided p-value over the pairs where both values are finite."""
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return {"rho": None, "p_value": None, "n": int(ok.sum())}
    result = spearmanr(a[ok], b[ok])
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": int(ok.sum())}


def per_sample_vulnerability(experiment: ExperimentDir, folder: Path, output: str) -> dict:
    """Per-sample member scores, end-of-training gradient norms and nearest-neighbour distances of one setting, and their correlations."""
    from mia_lightning.farm.checkpoints import load_model_checkpoint
    from mia_lightning.farm.export import read_recipe

    scores, members, targets = attack_scores(experiment, folder, output)
    datamodule, _ = read_recipe(experiment)
    if not hasattr(datamodule, "pool_features"):
        raise MiaError(f"{experiment.config_path}: {type(datamodule).__name__} has no backbone features; per-sample analysis needs an image DataModule")
    norms = np.full(scores.shape, np.nan)
    for row, target in enumerate(targets):
        module = load_model_checkpoint(experiment.model_dir(int(target)) / "model.ckpt", int(target))
        if not hasattr(module, "per_sample_gradient_norms"):
            raise MiaError(f"{experiment.root}: {type(module).__name__} models do not compute per-sample gradient norms")
        norms[row] = module.per_sample_gradient_norms(datamodule)
    score = member_means(scores, members)
    gradient = member_means(norms, members)
    distance = nearest_neighbour_distances(datamodule.pool_features())
    return {"score": score, "gradient_norm": gradient, "nn_distance": distance,
            "gradient_norm_correlation": spearman(score, gradient), "nn_distance_correlation": spearman(score, distance)}


def within_setting_percentiles(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1] among the finite values (NaN stays NaN), so settings can be pooled."""
    from scipy.stats import rankdata

    out = np.full(values.shape, np.nan)
    ok = np.isfinite(values)
    out[ok] = rankdata(values[ok]) / ok.sum()
    return out


# ------------------------------------------------------------------------------------------- tables


def _coefficient(fit: dict, name: str) -> str:
    c, ci = fit["coefficients"], fit["ci95_bootstrap"]
    return "-" if c.get(name) is None else f"{c[name]:.3f} [{ci[name][0]:.3f}, {ci[name][1]:.3f}]"


def _fit_row(label: list[str], fit: dict) -> list[str]:
    if "coefficients" not in fit:
        return [*label, fit.get("error", "-"), "", "", "", "", "", "", str(fit["n_settings"])]
    slopes = ", ".join(f"C={c}: {v['b_S']:.2f}" for c, v in (fit.get("per_class") or {}).items()) or "-"
    test = fit.get("interaction") or {}
    interaction = "-" if test.get("p_value") is None else f"{test['coefficient']:+.2f} (p={test['p_value']:.2g})"
    return [*label, _coefficient(fit, "b_S"), _coefficient(fit, "b_C"), _coefficient(fit, "b_0"), f"{fit['r2_fit']:.3f}",
            f"{fit['r2_leave_one_out']:.3f}", slopes, interaction, f"{fit['n_settings']} (-{len(fit['excluded'])})"]


def power_law_tables(settings: list[dict], fits: dict, transfer: list[dict], quantiles: list[dict], per_sample: dict, pooled: dict, attack: str) -> list[TableRecord]:
    """The study's tables: TPR per cell, the fitted power laws per scenario, the unseen-scenario predictions, the per-sample quantile slopes and correlations."""
    rows = []
    for s in settings:
        cells = [tpr_cell(s, level) if str(level) in s["tpr_at_fpr"] else "-" for level in FPR_LEVELS]
        rows.append([s["setting"], s["scenario"], str(s["shots"]), str(s["n_classes"]), "-" if s["val_acc"] is None else f"{s['val_acc']:.3f}",
                     f"{s['auc']:.3f}", *cells])
    out = [TableRecord(f"power-law study: {attack} per cell (TPR {{two-way bootstrap 95%}}; (!) FPR not resolved by the scores)",
                       ["setting", "scenario", "S", "C", "held-out acc", "AUC", *(f"TPR@{level:g}" for level in FPR_LEVELS)], rows)]
    header = ["scenario", "regressand", "FPR", "b_S", "b_C (descriptive)", "b_0", "R² fit", "R² leave-one-out", "b_S per C", "S x C (p)", "cells (excluded)"]
    fit_rows = [_fit_row([scenario, fit["quantity"], f"{fit['fpr']:g}"], fit) for scenario, by_level in fits.items() for fit in by_level]
    out.append(TableRecord("b_S log10 S + b_C log10 C + b_0, weighted by the cells' bootstrap variance (95% bootstrap over cells)", header, fit_rows))
    if transfer:
        out.append(TableRecord("unseen scenarios: predicted by the fit on the first scenario (log10(TPR - FPR); dex = log10 units)",
                               ["fitted on", "predicts", "FPR", "cells", "RMSE (dex)", "bias (dex, predicted - measured)", "R²", "cells outside the fitted S, C range"],
                               [[t["fitted_on"], t["scenario"], f"{t['fpr']:g}", str(t["n_cells"]), *(("-", "-", "-") if t["rmse"] is None else
                                 (f"{t['rmse']:.3f}", f"{t['bias']:+.3f}", f"{t['r2']:.3f}")), str(t.get("outside_fitted_range", "-"))] for t in transfer]))
    if quantiles:
        out.append(TableRecord("per-sample advantage quantiles: log10(quantile of TPR - FPR per sample) on log S, log C (95% bootstrap over cells)",
                               ["quantile", "FPR", "b_S", "b_C", "R² fit", "cells (excluded)"],
                               [[f"{q['quantile']:g}", f"{q['fpr']:g}", *((q["error"], "-", "-") if "coefficients" not in q else
                                 (_coefficient(q, "b_S"), _coefficient(q, "b_C"), f"{q['r2_fit']:.3f}")), f"{q['n_settings']} (-{q['n_excluded']})"] for q in quantiles]))
    if per_sample:
        sample_rows = []
        for name, result in {**per_sample, "pooled (within-setting percentiles)": pooled}.items():
            g, d = result["gradient_norm_correlation"], result["nn_distance_correlation"]
            sample_rows.append([name, _rho(g), _rho(d), str(g["n"])])
        out.append(TableRecord("per sample: Spearman rho (p-value) of the LiRA member score with ...",
                               ["setting", "gradient norm", "nearest-neighbour distance", "samples"], sample_rows))
    return out


def dp_line(dp: dict) -> str:
    """One line: which DP regions (add/remove, read as replace-one) contain the resolved ROC of the compared setting, and the smallest eps that does."""
    lines = [bound_text(b) for b in dp["bounds"]]
    smallest = ", ".join(f"replace-one {e['replace_one']:.2f} (Clopper-Pearson over pairs {e['replace_one_clopper_pearson']:.2f}; add/remove >= {e['add_remove_at_least']:.2f}) at delta {d}"
                         for d, e in dp["curve_epsilon"].items())
    return (f"(eps, delta)-DP regions vs the ROC of {dp['setting']} (vertices with >= {dp['min_events']} events; {dp['adjacency']}): "
            + "; ".join(lines) + f"; smallest eps containing the curve: {smallest}")


def _rho(result: dict) -> str:
    return "-" if result["rho"] is None else f"{result['rho']:.3f} (p={result['p_value']:.2g})"


def _per_sample_correlations(by_name: dict, chosen: list[str], attack: str) -> tuple[dict, dict]:
    """Per-sample correlations of the chosen settings, and pooled over them on within-setting percentiles."""
    samples = {name: per_sample_vulnerability(ExperimentDir(Path(by_name[name]["experiment"])), Path(by_name[name]["run_folder"]), attack) for name in chosen}
    if not samples:
        return {}, {}
    stacked = {key: np.concatenate([within_setting_percentiles(samples[n][key]) for n in chosen]) for key in ("score", "gradient_norm", "nn_distance")}
    pooled = {"gradient_norm_correlation": spearman(stacked["score"], stacked["gradient_norm"]),
              "nn_distance_correlation": spearman(stacked["score"], stacked["nn_distance"])}
    return samples, pooled


def check_params(settings: list[str], written: list[str] | None, *, attack: str, bootstrap: int, roc_setting: str | None,
                 per_sample_settings: list[str] | None, dp_bounds: list[list[float]] | None, sample_fpr: float, **unchecked: object) -> None:
    """Refuse parameters that name no setting (``settings``) or attack output (``written``, None: not known yet) of the study, or unusable numbers.

    ``train.py study`` calls it before any setting trains, ``analyse`` again; ``unchecked``: ``fit_scenario`` (checked once the settings' configs exist) and ``seed``.
    """
    if written is not None and attack not in written:
        raise MiaError(f"study.analysis_params.attack {attack!r}: the study's attacks write no such output ({', '.join(written)}); add its attack to study.attacks")
    if bootstrap < 1:
        raise MiaError(f"study.analysis_params.bootstrap {bootstrap}: needs at least 1 bootstrap replicate (the fits' intervals)")
    if not 0.0 < sample_fpr < 1.0:
        raise MiaError(f"study.analysis_params.sample_fpr {sample_fpr}: must lie strictly between 0 and 1")
    for name, chosen in (("roc_setting", [roc_setting] if roc_setting is not None else []), ("per_sample_settings", per_sample_settings or [])):
        unknown = [setting for setting in chosen if setting not in settings]
        if unknown:
            raise MiaError(f"study.analysis_params.{name} {unknown[0]!r}: not a setting of the study; settings are {', '.join(settings)}")
    for bound in dp_bounds or []:
        if len(bound) != 2 or not bound[0] > 0 or not 0 <= bound[1] < 1:
            raise MiaError(f"study.analysis_params.dp_bounds {bound}: each bound is [epsilon > 0, 0 <= delta < 1], e.g. [1.0, 1.0e-5]")


def analyse(
    study_dir: Path,
    rows: list[dict],
    attack: str = "lira_online",
    bootstrap: int = 2000,
    seed: int = 0,
    fit_scenario: str | None = None,
    dp_bounds: list[list[float]] | None = None,
    roc_setting: str | None = None,
    per_sample_settings: list[str] | None = None,
    sample_fpr: float = 0.1,
) -> dict:
    """The study's analysis (``study.analysis: power_law``): fits, predictions, plots, per-sample results and the DP comparison; writes its files under ``study_dir``.

    ``fit_scenario``: the scenario whose cells are fitted and plotted (default: the first setting's);
    every other scenario is fitted on its own too and predicted by it. ``per_sample_settings``: the
    settings whose gradient norms and nearest-neighbour distances are correlated (each loads its
    models; none by default). ``sample_fpr``: the FPR of the per-sample advantages.
    """
    study_dir = Path(study_dir)
    if not rows:
        raise MiaError("power_law analysis: the study has no audited settings")
    check_params([row["setting"] for row in rows], None, attack=attack, bootstrap=bootstrap, roc_setting=roc_setting,
                 per_sample_settings=per_sample_settings, dp_bounds=dp_bounds, sample_fpr=sample_fpr)
    confined_all(study_dir, [study_dir / name for name in ("power_law.png", "predictions.png", "per_sample.png", "dp_bound.png", ANALYSIS_PAGE)])  # before any is written
    settings = [_setting_summary(row, attack) for row in rows]
    scenarios = list(dict.fromkeys(s["scenario"] for s in settings))
    main = fit_scenario or scenarios[0]
    if main not in scenarios:
        raise MiaError(f"analysis_params.fit_scenario {main!r}: not a scenario of the study ({', '.join(scenarios)})")
    cells = {name: [s for s in settings if s["scenario"] == name] for name in scenarios}
    fits = {name: [fit_power_law(cells[name], level, bootstrap, seed) for level in FPR_LEVELS] for name in scenarios}
    secondary = [fit_power_law(cells[main], level, bootstrap, seed, quantity="tpr") for level in FPR_LEVELS]
    transfer = [{"fitted_on": main, "scenario": name, **predict(fit, cells[name], fit["fpr"])} for name in scenarios if name != main for fit in fits[main]]
    by_name = {row["setting"]: row for row in rows}
    for cell in cells[main]:
        scores, members, _ = attack_scores(ExperimentDir(Path(cell["experiment"])), Path(cell["run_folder"]), attack)
        cell["sample_advantages"] = sample_advantages(scores, members, sample_fpr)
    quantiles = fit_sample_quantiles(cells[main], SAMPLE_QUANTILES, sample_fpr, bootstrap, seed)
    for cell in cells[main]:
        del cell["sample_advantages"]
    plot_power_law(study_dir / "power_law.png", cells[main], fits[main], main)
    if transfer:
        plot_predictions(study_dir / "predictions.png", transfer, main)
    samples, pooled = _per_sample_correlations(by_name, per_sample_settings or [], attack)
    if samples:
        plot_per_sample(study_dir / "per_sample.png", samples)
    bounds = [(float(e), float(d)) for e, d in (dp_bounds or DEFAULT_DP_BOUNDS)]
    name = roc_setting or max(settings, key=lambda s: s["auc"])["setting"]
    from mia_lightning.metrics import roc_curve

    scores, members, _ = attack_scores(ExperimentDir(Path(by_name[name]["experiment"])), Path(by_name[name]["run_folder"]), attack)
    curve = roc_curve(scores, members)
    dp = {**compare(curve, bounds), "setting": name}
    plot_dp_bound(study_dir / "dp_bound.png", [(f"{attack} on {name}", curve.fpr, curve.tpr)], bound_curves(bounds), f"{attack} on {name}: {dp['adjacency']}")
    fit_table = {**{name: fits[name] for name in scenarios}, f"{main} (secondary)": secondary}
    tables = power_law_tables(settings, fit_table, transfer, quantiles, samples, pooled, attack)
    print_tables(tables, console)
    console.print(dp_line(dp))
    figures = [(study_dir / name, alt) for name, alt in (("power_law.png", "advantage against shots per class"), ("dp_bound.png", "ROC against DP bounds"))]
    if transfer:
        figures.insert(1, (study_dir / "predictions.png", "unseen scenarios: predicted against measured advantage"))
    if samples:
        figures.append((study_dir / "per_sample.png", "per-sample vulnerability"))
    write_tables_page(confined(study_dir, study_dir / ANALYSIS_PAGE), f"Power-law study: {Path(study_dir).name}", tables, figures, [dp_line(dp)])
    return {
        "attack": attack,
        "fit_scenario": main,
        "settings": settings,
        "fits": fits[main],
        "fits_log_tpr": secondary,
        "fits_by_scenario": fits,
        "transfer": transfer,
        "sample_quantiles": quantiles,
        "per_sample": {name: {"gradient_norm": s["gradient_norm_correlation"], "nn_distance": s["nn_distance_correlation"]} for name, s in samples.items()},
        "per_sample_pooled": {"gradient_norm": pooled.get("gradient_norm_correlation"), "nn_distance": pooled.get("nn_distance_correlation")} if pooled else None,
        "dp": dp,
        "files": {"power_law": str(study_dir / "power_law.png"), "dp_bound": str(study_dir / "dp_bound.png"),
                  **({"predictions": str(study_dir / "predictions.png")} if transfer else {}),
                  **({"per_sample": str(study_dir / "per_sample.png")} if samples else {})},
    }
