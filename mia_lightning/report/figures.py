"""Figures of the analyses (few-shadow curve, power law, DP bound, per-sample vulnerability, privacy-utility): the analyses compute, these draw.

Every figure is written atomically through ``terminal.save_figure`` (a killed study never leaves half a PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mia_lightning.report.terminal import save_figure


def plot_power_law(path: Path, cells: list[dict], fits: list[dict], scenario: str) -> None:
    """log-log advantage TPR - FPR vs S, one panel per FPR level: every cell (draws side by side) with its bootstrap bar, fitted lines per C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4.2), squeeze=False)
    class_values = sorted({c["n_classes"] for c in cells})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(class_values)))
    for ax, fit in zip(axes[0], fits):
        key, level = str(fit["fpr"]), fit["fpr"]
        floor = level / 10
        for colour, c in zip(colours, class_values):
            rows = sorted((s for s in cells if s["n_classes"] == c), key=lambda s: s["shots"])
            shots = np.asarray([s["shots"] for s in rows], dtype=float) * (1 + 0.04 * (class_values.index(c) - 1))
            advantage = np.asarray([s["tpr_at_fpr"][key] for s in rows]) - level
            bounds = np.asarray([(s.get("tpr_at_fpr_ci_bootstrap") or {}).get(key) or [np.nan, np.nan] for s in rows], dtype=float).reshape(-1, 2) - level
            used = np.isin([s["setting"] for s in rows], fit.get("settings", []))
            shown = np.maximum(advantage, floor)
            low, high = np.maximum(np.nan_to_num(bounds[:, 0], nan=advantage), floor), np.maximum(np.nan_to_num(bounds[:, 1], nan=advantage), floor)
            ax.errorbar(shots[used], shown[used], yerr=[np.maximum(shown[used] - low[used], 0), np.maximum(high[used] - shown[used], 0)],
                        fmt="o", ms=3, color=colour, capsize=2, label=f"C = {c}")
            if (~used).any():
                ax.scatter(shots[~used], shown[~used], facecolors="none", edgecolors=colour, marker="o", s=14)
            coefficients = fit.get("coefficients")
            if coefficients and shots.size:
                grid = np.logspace(np.log10(min(s["shots"] for s in rows)), np.log10(max(s["shots"] for s in rows)), 50)
                b_c = coefficients.get("b_C") or 0.0
                ax.plot(grid, 10 ** (coefficients["b_S"] * np.log10(grid) + b_c * np.log10(c) + coefficients["b_0"]), color=colour, lw=1)
        ax.set(xscale="log", yscale="log", xlabel="shots per class S", ylabel=f"TPR - FPR at FPR = {level:g}")
        title = f"FPR {level:g}"
        if fit.get("coefficients"):
            title += f": b_S = {fit['coefficients']['b_S']:.2f}, R² = {fit['r2_fit']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{scenario}: advantage vs shots, every class subset and draw (bars: two-way bootstrap 95%; hollow: not in the fit; theory: slope -1/2)", fontsize=8)
    save_figure(fig, path)


def plot_predictions(path: Path, transfer: list[dict], fitted_on: str) -> None:
    """Predicted against measured log10(TPR - FPR) of every unseen scenario's usable cells, one panel per FPR level, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({t["fpr"] for t in transfer})
    scenarios = list(dict.fromkeys(t["scenario"] for t in transfer))
    colours = plt.cm.tab10(np.arange(max(len(scenarios), 1)) % 10)
    fig, axes = plt.subplots(1, max(len(levels), 1), figsize=(4.6 * max(len(levels), 1), 4.4), squeeze=False)
    for ax, level in zip(axes[0], levels):
        values = []
        for colour, scenario in zip(colours, scenarios):
            t = next((t for t in transfer if t["scenario"] == scenario and t["fpr"] == level), None)
            if t is None or t.get("rmse") is None:
                continue
            ax.scatter(t["measured"], t["predicted"], s=14, color=colour, label=f"{scenario}: RMSE {t['rmse']:.2f}, bias {t['bias']:+.2f}")
            values += [*t["measured"], *t["predicted"]]
        if values:
            low, high = min(values) - 0.1, max(values) + 0.1
            ax.plot([low, high], [low, high], color="grey", ls=":", lw=1)
        ax.set(xlabel="measured log10(TPR - FPR)", ylabel="predicted log10(TPR - FPR)", title=f"FPR {level:g}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    fig.suptitle(f"unseen scenarios predicted by the fit on {fitted_on} (dex = log10 units; dotted: y = x)", fontsize=8)
    save_figure(fig, path)


def plot_dp_bound(path: Path, curves: list[tuple[str, np.ndarray, np.ndarray]], bound_curves: list[tuple[str, np.ndarray, np.ndarray]], title: str,
                  points: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None = None) -> None:
    """Measured ROCs (log-log) with the DP upper bounds on TPR (``(label, fpr, tpr bound)``, computed by the analysis).

    ``points``: (label, FPR levels, TPR, [2, k] bootstrap intervals) drawn as error bars on the same axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    colours = plt.cm.tab10(np.arange(max(len(curves), len(bound_curves), 1)) % 10)
    for colour, (label, fpr, tpr) in zip(colours, curves):
        positive = fpr > 0
        ax.plot(fpr[positive], tpr[positive], color=colour, lw=1.5, label=label)
    for colour, (label, levels, tpr, interval) in zip(colours, points or []):
        ax.errorbar(levels, np.maximum(tpr, 1e-5), yerr=[np.maximum(tpr - interval[0], 0), np.maximum(interval[1] - tpr, 0)], fmt="s", ms=3, color=colour, capsize=2)
    for colour, (label, grid, bound) in zip(colours, bound_curves):
        ax.plot(grid, bound, ls="--", lw=1, color=colour if len(curves) == len(bound_curves) else None, label=label)
    ax.plot([1e-5, 1], [1e-5, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-5, 1), ylim=(1e-5, 1.05), xlabel="FPR", ylabel="TPR")
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=6)
    save_figure(fig, path)


def plot_per_sample(path: Path, samples: dict[str, dict]) -> None:
    """LiRA member score against gradient norm and against nearest-neighbour distance, one row per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)[:6]
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 2.6 * len(names)), squeeze=False)
    for (left, right), name in zip(axes, names):
        data = samples[name]
        for ax, key, label in ((left, "gradient_norm", "gradient norm (end of training)"), (right, "nn_distance", "nearest-neighbour distance")):
            ax.scatter(data[key], data["score"], s=4, alpha=0.5)
            rho = data[f"{key}_correlation"]["rho"]
            ax.set(xscale="log", xlabel=label, ylabel="LiRA score as member", title=f"{name}: Spearman {rho:.2f}" if rho is not None else name)
            ax.title.set_fontsize(8)
    save_figure(fig, path)


def plot_privacy_utility(settings: list[dict], attack: str, front: np.ndarray, path: Path) -> None:
    """Test accuracy against the attack's TPR@1%FPR (bootstrap bars) per defence setting, with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    xs = np.array([s["test_accuracy"] for s in settings], dtype=float)
    ys = np.array([100 * s["attacks"][attack]["tpr@0.01"] for s in settings], dtype=float)
    errors = np.array([[ys[i] - 100 * s["attacks"][attack]["tpr@0.01_ci"][0], 100 * s["attacks"][attack]["tpr@0.01_ci"][1] - ys[i]] for i, s in enumerate(settings)]).T
    ax.errorbar(100 * xs, ys, yerr=np.clip(errors, 0, None), fmt="o", color="tab:blue", capsize=3)
    order = np.argsort(xs[front])
    ax.plot(100 * xs[front][order], ys[front][order], "--", color="tab:red", label="Pareto front")
    for s, x, y in zip(settings, xs, ys):
        label = s["setting"] + (f" (eps {s['accountant_epsilon']:.1f})" if s["accountant_epsilon"] is not None else "")
        ax.annotate(label, (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel(f"{attack} TPR at 1% FPR (%)")
    ax.set_title("privacy-utility trade-off of the defences")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(loc="best")
    save_figure(fig, path)


def plot_few_shadow(rows: list[dict], path: Path, title: str, metrics: tuple[str, ...]) -> None:
    """AUC and TPR@FPR against the number of shadow models (log x), one line per attack output, as PNG."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    names = list(dict.fromkeys(row["attack"] for row in rows))
    counts = sorted({row["n_shadows"] for row in rows})
    for ax, metric in zip(axes, metrics):
        for name in names:
            points = [(row["n_shadows"], row[metric]) for row in rows if row["attack"] == name and row[metric] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", linewidth=1.2, label=name)
        ax.set(xscale="log", xlabel="shadow / reference models", ylabel=metric, title=metric)
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, Path(path))
