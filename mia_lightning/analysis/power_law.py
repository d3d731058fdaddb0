"""The power-law study: MIA vulnerability against shots per class S and classes C, per-sample vulnerability, and the DP bound.

Tobaben et al., "Impact of Dataset Properties on Membership Inference Vulnerability of Deep Transfer
Learning" (NeurIPS 2025; arXiv 2402.06674, "Understanding Practical Membership Privacy of Deep
Learning"): for fine-tuned pretrained models, log10 TPR at a fixed low FPR falls linearly in log10 S.
Over the settings of a study (``train.py study ... analysis: power_law``) this module

1. fits log10 TPR@FPR = b_S log10 S + b_C log10 C + b_0 by least squares for each FPR level, with
   95% bootstrap intervals of the coefficients (cases = settings, resampled with replacement,
   percentile intervals), R^2 on the fitted settings, leave-one-setting-out R^2 (each setting
   predicted by the fit on the others) and R^2 on held-out classes (fit on the settings with other
   C values, evaluated on ``held_out_classes``, default the largest C: an unseen dataset size).
   A setting enters the fit at level x only if its TPR@x > 0 and its scores resolve FPR x (at least
   1/x non-member pairs); the others are listed as excluded, never floored;
2. plots TPR vs S (log-log) per C with Clopper-Pearson intervals and the fitted lines (``power_law.png``);
3. per sample (Tobaben et al. Sec. 5): Spearman correlation, with its p-value, of each sample's LiRA
   score as a member (mean over the targets that trained on it) with its gradient norm at the end of
   training (mean over the same targets; closed form for linear heads) and with its nearest-neighbour
   distance in the backbone's feature space (Euclidean, to the closest other pool sample);
4. draws the (eps, delta)-DP region beside a measured ROC (``dp_bound.png``): every test against an
   (eps, delta)-DP mechanism has TPR <= e^eps FPR + delta and TPR <= 1 - e^-eps (1 - delta - FPR)
   (Kairouz, Oh and Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mia_lightning.console import console
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json
from mia_lightning.report.cells import tpr_cell
from mia_lightning.contract.confine import confined, confined_all
from mia_lightning.report.html import ANALYSIS_PAGE, write_tables_page
from mia_lightning.report.figures import plot_dp_bound, plot_per_sample, plot_power_law
from mia_lightning.report.table import TableRecord
from mia_lightning.report.terminal import print_tables

log = logging.getLogger("mia_lightning")

FPR_LEVELS: tuple[float, ...] = (0.001, 0.01, 0.1)
DEFAULT_DP_BOUNDS: tuple[tuple[float, float], ...] = ((1.0, 1e-5), (4.0, 1e-5), (8.0, 1e-5))


# ------------------------------------------------------------------------------------------- the fit


def design_matrix(shots: np.ndarray, classes: np.ndarray, with_classes: bool = True) -> np.ndarray:
    """Columns [log10 S, log10 C, 1] (or [log10 S, 1] when C does not vary)."""
    columns = [np.log10(shots)] + ([np.log10(classes)] if with_classes else []) + [np.ones(len(shots))]
    return np.column_stack(columns).astype(np.float64)


def least_squares(X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Ordinary least-squares coefficients, or None when the design is rank-deficient (not identifiable)."""
    if X.shape[0] < X.shape[1] or np.linalg.matrix_rank(X) < X.shape[1]:
        return None
    return np.linalg.lstsq(X, y, rcond=None)[0]


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SS_res / SS_tot (NaN when y does not vary)."""
    total = float(((y - y.mean()) ** 2).sum())
    return float("nan") if total == 0 else 1.0 - float(((y - predicted) ** 2).sum()) / total


def leave_one_out_r_squared(X: np.ndarray, y: np.ndarray) -> float:
    """Predictive R^2: every point predicted by the fit on all the others (NaN if some fit is not identifiable)."""
    predictions = np.empty_like(y)
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        beta = least_squares(X[others], y[others])
        if beta is None:
            return float("nan")
        predictions[i] = X[i] @ beta
    return r_squared(y, predictions)


def bootstrap_intervals(X: np.ndarray, y: np.ndarray, replicates: int, seed: int) -> tuple[np.ndarray, int]:
    """Percentile 95% intervals [k, 2] of the coefficients over case-resampling replicates (rank-deficient draws skipped), and the replicates used."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        pick = rng.integers(0, len(y), len(y))
        beta = least_squares(X[pick], y[pick])
        if beta is not None:
            draws.append(beta)
    if not draws:
        return np.full((X.shape[1], 2), np.nan), 0
    stacked = np.asarray(draws)
    return np.percentile(stacked, [2.5, 97.5], axis=0).T, len(draws)


def fit_power_law(settings: list[dict], level: float, replicates: int = 2000, seed: int = 0, held_out_classes: list[int] | None = None) -> dict:
    """The least-squares fit of log10 TPR@level on log10 S and log10 C over ``settings`` (see the module docstring)."""
    key = str(level)
    used, excluded = [], []
    for s in settings:
        tpr, resolvable = s["tpr_at_fpr"][key], s["min_resolvable_fpr"] <= level
        if not resolvable:
            excluded.append({"setting": s["setting"], "reason": f"scores resolve FPR >= {s['min_resolvable_fpr']:.2g} only ({s['n_nonmembers']} non-member pairs)"})
        elif tpr <= 0:
            excluded.append({"setting": s["setting"], "reason": "TPR 0 (log undefined)"})
        else:
            used.append(s)
    result: dict[str, Any] = {"fpr": level, "n_settings": len(used), "excluded": excluded, "settings": [s["setting"] for s in used]}
    shots = np.asarray([s["shots"] for s in used], dtype=np.float64)
    classes = np.asarray([s["n_classes"] for s in used], dtype=np.float64)
    y = np.log10([s["tpr_at_fpr"][key] for s in used]) if used else np.zeros(0)
    with_classes = np.unique(classes).size > 1
    X = design_matrix(shots, classes, with_classes)
    beta = least_squares(X, y)
    if beta is None:
        result["error"] = f"{len(used)} usable settings with {np.unique(shots).size} shot values: not enough to fit"
        return result
    names = ["b_S", "b_C", "b_0"] if with_classes else ["b_S", "b_0"]
    intervals, used_replicates = bootstrap_intervals(X, y, replicates, seed)
    result.update({
        "coefficients": dict(zip(names, map(float, beta))),
        "ci95_bootstrap": {name: [float(lo), float(hi)] for name, (lo, hi) in zip(names, intervals)},
        "bootstrap_replicates": used_replicates,
        "r2_fit": r_squared(y, X @ beta),
        "r2_leave_one_out": leave_one_out_r_squared(X, y),
    })
    if not with_classes:
        result["coefficients"]["b_C"] = None
    if with_classes:
        held = sorted(held_out_classes) if held_out_classes else [int(classes.max())]
        test = np.isin(classes, held)
        train_beta = least_squares(X[~test], y[~test]) if np.unique(classes[~test]).size > 1 else None
        if test.any() and train_beta is not None:
            result["r2_held_out"] = {"classes": held, "n_settings": int(test.sum()), "value": r_squared(y[test], X[test] @ train_beta),
                                     "coefficients_without": dict(zip(names, map(float, train_beta)))}
        else:
            result["r2_held_out"] = {"classes": held, "value": None, "reason": "the other settings span fewer than two class counts"}
    return result


# ------------------------------------------------------------------------------------- study settings


def _setting_summary(row: dict, attack: str) -> dict:
    """S, C, the attack's TPRs with Clopper-Pearson intervals, and utility of one audited setting."""
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
    return {"setting": row["setting"], "experiment": str(experiment.root), "shots": int(shots), "n_classes": int(classes),
            "auc": results["auc"], "tpr_at_fpr": results["tpr_at_fpr"], "tpr_at_fpr_ci": results["tpr_at_fpr_ci"],
            "tpr_at_fpr_ci_bootstrap": results.get("tpr_at_fpr_ci_bootstrap") or {},
            "min_resolvable_fpr": results.get("min_resolvable_fpr", 0.0), "n_members": results["n_members"], "n_nonmembers": results["n_nonmembers"],
            "val_acc": float(np.mean(accuracies)) if accuracies else None}


def attack_scores(experiment: ExperimentDir, output: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [T, n], members bool [T, n], target ids) of ``output`` in the experiment's latest attack run."""
    from mia_lightning.contract.io import load_npy
    from mia_lightning.contract.runs import latest_run

    folder, _ = latest_run(experiment)
    results = load_json(folder / output / "results.json")
    targets = np.asarray(results["targets"], dtype=np.int64)
    scores = load_npy(folder / output / "scores.npy", "attack scores", "re-run attack.py on the experiment")
    return np.asarray(scores, dtype=np.float64), experiment.keep[targets], targets


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


def per_sample_vulnerability(experiment: ExperimentDir, output: str) -> dict:
    """Per-sample member scores, end-of-training gradient norms and nearest-neighbour distances of one setting, and their correlations."""
    from mia_lightning.farm.checkpoints import load_model_checkpoint
    from mia_lightning.farm.export import read_recipe

    scores, members, targets = attack_scores(experiment, output)
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


# ----------------------------------------------------------------------------------------- DP bound


def dp_tpr_bound(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR any test can reach at ``fpr`` against an (epsilon, delta)-DP mechanism (both inequalities, capped at 1)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    first = np.exp(epsilon) * fpr + delta
    symmetric = 1.0 - np.exp(-epsilon) * (1.0 - delta - fpr)
    return np.clip(np.minimum(first, symmetric), 0.0, 1.0)


def resolved_vertices(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """bool mask of ROC vertices with 0 < FPR and TPR < 1: an empirical FPR of 0 (TPR of 1) only says the rate is below 1/N, so no bound is checked there."""
    return (np.asarray(fpr) > 0) & (np.asarray(tpr) < 1)


def curve_epsilon(fpr: np.ndarray, tpr: np.ndarray, delta: float) -> float:
    """The smallest epsilon whose (epsilon, delta) region contains every resolved ROC vertex (descriptive: no confidence attached)."""
    keep = resolved_vertices(fpr, tpr)
    fpr, tpr = np.asarray(fpr, dtype=np.float64)[keep], np.asarray(tpr, dtype=np.float64)[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(tpr - delta > 0, np.log((tpr - delta) / fpr), 0.0)
        second = np.where(1 - fpr - delta > 0, np.log((1 - fpr - delta) / (1 - tpr)), 0.0)
    return float(max(0.0, first.max(initial=0.0), second.max(initial=0.0)))


def dp_comparison(experiment: ExperimentDir, output: str, bounds: list[tuple[float, float]]) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """The measured ROC of one setting against each (epsilon, delta) region: does the curve leave it (at resolved vertices), and by how much."""
    from mia_lightning.metrics import roc_curve

    scores, members, _ = attack_scores(experiment, output)
    curve = roc_curve(scores, members)
    keep = resolved_vertices(curve.fpr, curve.tpr)
    fpr, tpr = curve.fpr[keep], curve.tpr[keep]
    comparisons = []
    for epsilon, delta in bounds:
        excess = tpr - dp_tpr_bound(fpr, epsilon, delta) if fpr.size else np.zeros(1)
        worst = int(np.argmax(excess))
        comparisons.append({"epsilon": epsilon, "delta": delta, "curve_inside": bool(excess.max() <= 0), "max_excess": float(excess.max()),
                            "at_fpr": float(fpr[worst]) if fpr.size else None, "tpr": float(tpr[worst]) if fpr.size else None})
    epsilons = {str(d): curve_epsilon(curve.fpr, curve.tpr, d) for d in sorted({d for _, d in bounds})}
    return {"bounds": comparisons, "curve_epsilon": epsilons, "n_nonmembers": curve.n_negatives}, (curve.fpr, curve.tpr)


# ------------------------------------------------------------------------------------------- tables


def power_law_tables(settings: list[dict], fits: list[dict], per_sample: dict, pooled: dict, attack: str) -> list[TableRecord]:
    """The study's tables: TPR per setting, the fitted power laws, and (when computed) the per-sample correlations."""
    rows = []
    for s in settings:
        cells = [tpr_cell(s, level) if str(level) in s["tpr_at_fpr"] else "-" for level in FPR_LEVELS]
        rows.append([s["setting"], str(s["shots"]), str(s["n_classes"]), "-" if s["val_acc"] is None else f"{s['val_acc']:.3f}", f"{s['auc']:.3f}", *cells])
    out = [TableRecord(f"power-law study: {attack} per setting (TPR {{two-way bootstrap 95%}}; (!) FPR not resolved by the scores)",
                       ["setting", "S", "C", "val acc", "AUC", *(f"TPR@{level:g}" for level in FPR_LEVELS)], rows)]
    fit_rows = []
    for fit in fits:
        if "coefficients" not in fit:
            fit_rows.append([f"{fit['fpr']:g}", fit.get("error", "-"), "", "", "", "", "", str(fit["n_settings"])])
            continue
        c, ci = fit["coefficients"], fit["ci95_bootstrap"]

        def show(name: str) -> str:
            return "-" if c.get(name) is None else f"{c[name]:.3f} [{ci[name][0]:.3f}, {ci[name][1]:.3f}]"

        held = fit.get("r2_held_out") or {}
        held_text = "-" if held.get("value") is None else f"{held['value']:.3f} (C={','.join(map(str, held['classes']))}, {held['n_settings']})"
        fit_rows.append([f"{fit['fpr']:g}", show("b_S"), show("b_C"), show("b_0"), f"{fit['r2_fit']:.3f}", f"{fit['r2_leave_one_out']:.3f}", held_text,
                         f"{fit['n_settings']} (+{len(fit['excluded'])} excluded)"])
    out.append(TableRecord("log10 TPR = b_S log10 S + b_C log10 C + b_0 (95% bootstrap over settings)",
                           ["FPR", "b_S", "b_C", "b_0", "R² fit", "R² leave-one-out", "R² held-out C", "settings"], fit_rows))
    if per_sample:
        sample_rows = []
        for name, result in {**per_sample, "pooled (within-setting percentiles)": pooled}.items():
            g, d = result["gradient_norm_correlation"], result["nn_distance_correlation"]
            sample_rows.append([name, _rho(g), _rho(d), str(g["n"])])
        out.append(TableRecord("per sample: Spearman rho (p-value) of the LiRA member score with ...",
                               ["setting", "gradient norm", "nearest-neighbour distance", "samples"], sample_rows))
    return out


def dp_line(dp: dict) -> str:
    """One line: which (eps, delta)-DP regions contain the ROC of the compared setting, and the smallest eps that does."""
    lines = [_bound_text(b) for b in dp["bounds"]]
    return (f"(eps, delta)-DP regions vs the ROC of {dp['setting']} (vertices with 0 < FPR, TPR < 1): " + "; ".join(lines)
            + f"; smallest eps containing the curve: {', '.join(f'{e:.2f} (delta {d})' for d, e in dp['curve_epsilon'].items())}")


def _bound_text(bound: dict) -> str:
    where = "inside" if bound["curve_inside"] else f"left by {bound['max_excess']:.3f} TPR at FPR {bound['at_fpr']:.2g}"
    return f"({bound['epsilon']:g}, {bound['delta']:g}): {where}"


def _rho(result: dict) -> str:
    return "-" if result["rho"] is None else f"{result['rho']:.3f} (p={result['p_value']:.2g})"


def analyse(
    study_dir: Path,
    rows: list[dict],
    attack: str = "lira_online",
    bootstrap: int = 2000,
    seed: int = 0,
    held_out_classes: list[int] | None = None,
    dp_bounds: list[list[float]] | None = None,
    roc_setting: str | None = None,
    per_sample: bool = True,
    per_sample_settings: list[str] | None = None,
) -> dict:
    """The study's analysis (``study.analysis: power_law``): fits, plots, per-sample correlations and the DP comparison; writes its files under ``study_dir``."""
    study_dir = Path(study_dir)
    if not rows:
        raise MiaError("power_law analysis: the study has no audited settings")
    confined_all(study_dir, [study_dir / name for name in ("power_law.png", "per_sample.png", "dp_bound.png", ANALYSIS_PAGE)])  # before any is written
    settings = [_setting_summary(row, attack) for row in rows]
    fits = [fit_power_law(settings, level, bootstrap, seed, held_out_classes) for level in FPR_LEVELS]
    plot_power_law(study_dir / "power_law.png", settings, fits)
    by_name = {row["setting"]: row for row in rows}
    samples: dict[str, dict] = {}
    pooled: dict = {}
    if per_sample:
        chosen = per_sample_settings or list(by_name)
        unknown = [name for name in chosen if name not in by_name]
        if unknown:
            raise MiaError(f"analysis_params.per_sample_settings: {unknown[0]!r} is not a setting of the study")
        for name in chosen:
            samples[name] = per_sample_vulnerability(ExperimentDir(Path(by_name[name]["experiment"])), attack)
        stacked = {key: np.concatenate([within_setting_percentiles(samples[n][key]) for n in chosen]) for key in ("score", "gradient_norm", "nn_distance")}
        pooled = {"gradient_norm_correlation": spearman(stacked["score"], stacked["gradient_norm"]),
                  "nn_distance_correlation": spearman(stacked["score"], stacked["nn_distance"])}
        plot_per_sample(study_dir / "per_sample.png", samples)
    bounds = [(float(e), float(d)) for e, d in (dp_bounds or DEFAULT_DP_BOUNDS)]
    name = roc_setting or max(settings, key=lambda s: s["auc"])["setting"]
    if name not in by_name:
        raise MiaError(f"analysis_params.roc_setting {name!r}: not a setting of the study")
    dp, curve = dp_comparison(ExperimentDir(Path(by_name[name]["experiment"])), attack, bounds)
    dp["setting"] = name
    grid = np.logspace(-5, 0, 400)
    bound_curves = [(f"({epsilon:g}, {delta:g})-DP bound", grid, dp_tpr_bound(grid, epsilon, delta)) for epsilon, delta in bounds]
    plot_dp_bound(study_dir / "dp_bound.png", curve, bound_curves, f"{attack} on {name}")
    tables = power_law_tables(settings, fits, samples, pooled, attack)
    print_tables(tables, console)
    console.print(dp_line(dp))
    figures = [(study_dir / name, alt) for name, alt in (("power_law.png", "TPR against shots per class"), ("dp_bound.png", "ROC against DP bounds"),
                                                         ("per_sample.png", "per-sample vulnerability"))]
    write_tables_page(confined(study_dir, study_dir / ANALYSIS_PAGE), f"Power-law study: {Path(study_dir).name}", tables, figures, [dp_line(dp)])
    return {
        "attack": attack,
        "settings": settings,
        "fits": fits,
        "per_sample": {name: {"gradient_norm": s["gradient_norm_correlation"], "nn_distance": s["nn_distance_correlation"]} for name, s in samples.items()},
        "per_sample_pooled": {"gradient_norm": pooled.get("gradient_norm_correlation"), "nn_distance": pooled.get("nn_distance_correlation")} if pooled else None,
        "dp": dp,
        "files": {"power_law": str(study_dir / "power_law.png"), "dp_bound": str(study_dir / "dp_bound.png"),
                  **({"per_sample": str(study_dir / "per_sample.png")} if samples else {})},
    }
