"""Defences compared honestly: one row per study setting (baseline and each defence), one table, one plot.

Per setting (an audited farm): test accuracy and train-test gap of the targets (the run's
``utility.json``, ``mia_lightning.utility``), every requested attack output's AUC and TPR at 0.1%
and 1% FPR (``levels``) with the audit's two-way bootstrap 95% intervals over the units it sampled
(targets x samples, or users), the empirical epsilon lower bound of the audit (``results.json``),
and for DP-SGD settings the accountant's epsilon of each target (``done.json`` metric
``dp_epsilon``, written by ``mia_lightning.defences.dp_sgd.DPSGD``; the largest over targets). DP-SGD
without noise has an infinite epsilon: ``null`` in ``done.json`` and in ``analysis.json`` (beside a
non-null ``accountant_delta``; a setting without DP-SGD has both null), as JSON holds no Infinity.

With ``dp_bounds`` every DP-SGD setting also gets its ROC plot (``roc_dp_<setting>.png``) beside the
(epsilon, delta) region its accountant guarantees, drawn and compared as the replace-one region that
few-shot / LiRA-half plans need (``analysis.dp_bound``), read only at resolved ROC vertices.

"helps?" compares the ``attack`` output's TPR at 1% FPR with its baseline's (``baseline``, or the
setting named for it in ``baselines``, e.g. the undefended model of another family): ``yes`` when the
setting's bootstrap interval lies entirely below the baseline's, ``worse`` when entirely above, ``no``
otherwise (no measurable change), followed by the accuracy cost. The privacy-utility plot puts
test accuracy against that TPR and draws the Pareto front (settings no other setting beats on both).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mia_lightning.analysis.dp_bound import ADJACENCY_NOTE, MIN_EVENTS, bound_curves, bound_text, compare, resolved
from mia_lightning.console import console
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json
from mia_lightning.contract.runs import output_scores, setting_fix
from mia_lightning.report.cells import UNRESOLVED, unresolved
from mia_lightning.contract.confine import confined, confined_all
from mia_lightning.report.html import ANALYSIS_PAGE, write_tables_page
from mia_lightning.metrics import FPR_LEVELS, roc_curve
from mia_lightning.report.figures import plot_dp_bound, plot_privacy_utility
from mia_lightning.report.table import TableRecord
from mia_lightning.report.terminal import print_tables

DEFAULT_OUTPUTS = ("lira_online", "rmia_online", "shokri_per_class", "shokri_shared")
PLOT_FILE = "privacy_utility.png"
LEVELS = ("0.001", "0.01")


def _pairs(experiment: ExperimentDir, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(members, audited) bool [T, n] of the targets: keep rows, audit rows, minus the population."""
    ids = np.asarray(targets, dtype=np.int64)
    members = experiment.keep[ids]
    audited = np.ones_like(members)
    if experiment.audit is not None:
        audited &= experiment.audit[ids]
    if experiment.population is not None:
        audited[:, experiment.population] = False
    return members, audited


def accountant_budget(experiment: ExperimentDir, targets: list[int]) -> tuple[float | None, float | None]:
    """The largest DP-SGD accountant epsilon and delta over the targets (``done.json`` metrics ``dp_epsilon``, ``dp_delta``), None without DP.

    ``dp_epsilon: null`` is DP-SGD without noise (an infinite epsilon; JSON files hold no Infinity): inf here.
    """
    epsilons, deltas = [], []
    for t in targets:
        done = experiment.model_dir(t) / "done.json"
        metrics = load_json(done).get("metrics", {}) if done.is_file() else {}
        if "dp_epsilon" in metrics:
            epsilons.append(math.inf if metrics["dp_epsilon"] is None else float(metrics["dp_epsilon"]))
        if "dp_delta" in metrics:
            deltas.append(float(metrics["dp_delta"]))
    return (max(epsilons) if epsilons else None), (max(deltas) if deltas else None)


def dp_roc(study_dir: Path, setting: dict, scores: np.ndarray, members: np.ndarray, audited: np.ndarray, attack: str, levels: tuple[str, ...]) -> dict:
    """The attack's ROC of one DP-SGD setting against its accountant's (epsilon, delta) drawn as replace-one, compared at resolved vertices; writes ``roc_dp_<setting>.png``."""
    curve = roc_curve(np.where(audited, scores, np.nan), members)
    epsilon, delta = setting["accountant_epsilon"], setting["accountant_delta"]
    bounds = [(epsilon, delta)] if np.isfinite(epsilon) and delta is not None else []
    result = {**compare(curve, bounds), "plot": f"roc_dp_{setting['setting']}.png"}
    entry = setting["attacks"][attack]
    points = [(attack, np.array([float(l) for l in levels]), np.array([entry[f"tpr@{l}"] for l in levels]), np.array([entry[f"tpr@{l}_ci"] for l in levels]).T)]
    first, second = resolved(curve.fpr, curve.tpr, curve.n_positives, curve.n_negatives)
    read = first | second
    budget = f"accountant ({epsilon:.2f}, {delta:.2g}) add/remove" if bounds else "eps = inf: no DP bound"
    adjacency = ADJACENCY_NOTE.replace(": ", ":\n", 1)
    title = (f"{attack} on {setting['setting']}: {budget}; bars: bootstrap 95% at FPR {', '.join(levels)}\n{adjacency}\n"
             f"ROC drawn only at resolved vertices (>= {MIN_EVENTS} events), where the bound is read")
    plot_dp_bound(confined(Path(study_dir), Path(study_dir) / result["plot"]), [(f"{attack} ROC (resolved vertices)", curve.fpr[read], curve.tpr[read])],
                  bound_curves(bounds), title, points)
    return result


def _attack_entry(row: dict, output: str, levels: tuple[str, ...]) -> dict[str, Any] | None:
    """One output's AUC, TPRs and intervals as the audit wrote them (``results.json``: two-way bootstrap over the sampled units)."""
    result = row["results"].get(output)
    if result is None:
        return None
    boot = result.get("tpr_at_fpr_ci_bootstrap") or {}
    return {
        "auc": result["auc"],
        "auc_ci": result.get("auc_ci_bootstrap"),
        **{f"tpr@{level}": result["tpr_at_fpr"][level] for level in levels},
        **{f"tpr@{level}_ci": boot.get(level, result["tpr_at_fpr_ci"][level]) for level in levels},
        "bootstrap": bool(boot),  # False: the intervals above are Clopper-Pearson over pairs, too narrow for a verdict
        "empirical_epsilon": (result.get("empirical_epsilon") or {}).get("epsilon_lower_bound"),
        "min_resolvable_fpr": result.get("min_resolvable_fpr", 0.0),
    }


def verdict(setting: dict, baseline: dict, attack: str) -> str:
    """``yes`` / ``no`` / ``worse`` (TPR@1%FPR intervals of ``attack`` against the baseline's) and the accuracy cost in points."""
    mine, base = setting["attacks"].get(attack), baseline["attacks"].get(attack)
    if mine is None or base is None:
        return f"n/a (no {attack})"
    if not (mine.get("bootstrap") and base.get("bootstrap")):
        return "n/a (no bootstrap interval: audit with --bootstrap 100)"
    low, high = mine["tpr@0.01_ci"]
    base_low, base_high = base["tpr@0.01_ci"]
    word = "yes" if high < base_low else "worse" if low > base_high else "no"
    change = 100 * (mine["tpr@0.01"] - base["tpr@0.01"])
    cost = 100 * (setting["test_accuracy"] - baseline["test_accuracy"]) if setting["test_accuracy"] is not None and baseline["test_accuracy"] is not None else float("nan")
    return f"{word} (TPR@1% {change:+.1f} pts, acc {cost:+.1f} pts)"


def pareto_front(accuracy: np.ndarray, leakage: np.ndarray) -> np.ndarray:
    """bool [k]: settings that no other setting beats on both (higher or equal accuracy AND lower or equal leakage, one strictly)."""
    dominated = np.zeros(len(accuracy), dtype=bool)
    for i in range(len(accuracy)):
        better = (accuracy >= accuracy[i]) & (leakage <= leakage[i]) & ((accuracy > accuracy[i]) | (leakage < leakage[i]))
        dominated[i] = better.any()
    return ~dominated


def defence_table(settings: list[dict], outputs: list[str], levels: tuple[str, ...] = LEVELS) -> TableRecord:
    """The defences table: one row per setting (utility, each output's AUC and TPRs with intervals, epsilon, the DP-bound comparison when made, verdict)."""

    def pct(value: float | None, ci: list[float] | None = None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    def short(output: str) -> str:
        return output.replace("_online", "").replace("_per_class", "/class").replace("_", " ")

    header = ["setting", "test acc %", "gap pts", "DP eps", *[f"{short(o)} AUC" for o in outputs],
              *[f"{short(o)} TPR@{float(l) * 100:g}%" for o in outputs if not o.startswith("shokri") for l in levels], "emp. eps",
              *(["ROC vs DP bound (replace-one)"] if any("dp_bound" in s for s in settings) else []), "helps?"]
    rows = []
    for s in settings:
        cells = [s["setting"], pct(s["test_accuracy"]), pct(s["train_test_gap"]), "-" if s["accountant_epsilon"] is None else f"{s['accountant_epsilon']:.2f}"]
        for o in outputs:
            entry = s["attacks"].get(o)
            cells.append("-" if entry is None else f"{entry['auc']:.3f}" + (f" [{entry['auc_ci'][0]:.3f}, {entry['auc_ci'][1]:.3f}]" if entry["auc_ci"] else ""))
        for o in outputs:
            if o.startswith("shokri"):
                continue
            entry = s["attacks"].get(o)
            cells += ["-" if entry is None else pct(entry[f"tpr@{l}"], entry[f"tpr@{l}_ci"]) + (UNRESOLVED if unresolved(entry, float(l)) else "")
                      for l in levels]
        emp = [e["empirical_epsilon"] for e in s["attacks"].values() if e.get("empirical_epsilon") is not None]
        cells.append("-" if not emp else f"{max(emp):.2f}")
        if "ROC vs DP bound (replace-one)" in header:
            bounds = (s.get("dp_bound") or {}).get("bounds") or []
            cells.append("; ".join(bound_text(b) for b in bounds) or "-")
        cells.append(s["helps"])
        rows.append(cells)
    return TableRecord("defences: utility and membership leakage per setting (95% bootstrap intervals; TPR in %; (!) FPR not resolved by the scores)",
                       header, rows, left=tuple(header))


def check_params(settings: list[str], written: list[str] | None, *, baseline: str, attack: str, outputs: list[str] | None,
                 baselines: dict[str, str] | None, levels: list[float] | None, **unchecked: object) -> None:
    """Refuse parameters that name no setting (``settings``) or attack output (``written``, None: not known yet) of the study, or FPRs the audit does not report.

    ``train.py study`` calls it before any setting trains, ``analyse`` again; ``unchecked``: ``dp_bounds`` (a flag).
    """
    shown = list(outputs or DEFAULT_OUTPUTS)
    if attack not in shown:
        raise MiaError(f"study.analysis_params.attack {attack!r}: not one of analysis_params.outputs ({', '.join(shown)}); the helps? verdict and the plot read it there")
    if written is not None and attack not in written:
        raise MiaError(f"study.analysis_params.attack {attack!r}: the study's attacks write no such output ({', '.join(written)}); add its attack to study.attacks")
    reported = [str(level) for level in FPR_LEVELS]
    for level in levels or []:
        if str(float(level)) not in reported:
            raise MiaError(f"study.analysis_params.levels {level}: the audit reports TPR at FPR {', '.join(reported)} only")
    if levels and 0.01 not in [float(level) for level in levels]:
        raise MiaError(f"study.analysis_params.levels {levels}: must include 0.01 (the helps? rule reads TPR at 1% FPR)")
    if baseline not in settings:
        raise MiaError(f"study.analysis_params.baseline {baseline!r}: no such setting; settings are {', '.join(settings)}")
    for setting, its_baseline in (baselines or {}).items():
        if setting not in settings or its_baseline not in settings:
            raise MiaError(f"study.analysis_params.baselines {setting!r}: {its_baseline!r}: both must be settings; settings are {', '.join(settings)}")


def analyse(study_dir: Path, rows: list[dict], baseline: str = "baseline", attack: str = "lira_online",
            outputs: list[str] | None = None, baselines: dict[str, str] | None = None,
            levels: list[float] | None = None, dp_bounds: bool = False) -> dict:
    """The defences table (printed), ``privacy_utility.png`` under ``study_dir``, and the JSON summary (returned).

    ``baselines`` maps a setting to the undefended setting it is judged against (another model family
    has its own baseline); every other setting is judged against ``baseline``. ``levels``: the FPRs
    of the TPR columns (default 0.1% and 1%; the audit computes 0.1%, 1%, 10%). ``dp_bounds``: a ROC
    plot per DP-SGD setting with its accountant's bound (module docstring).
    """
    names = [row["setting"] for row in rows]
    check_params(names, None, baseline=baseline, attack=attack, outputs=outputs, baselines=baselines, levels=levels)
    outputs = list(outputs or DEFAULT_OUTPUTS)
    levels_used = tuple(str(float(l)) for l in levels) if levels else LEVELS
    baselines = dict(baselines or {})
    confined_all(Path(study_dir), [Path(study_dir) / PLOT_FILE, Path(study_dir) / ANALYSIS_PAGE, *(Path(study_dir) / f"roc_dp_{name}.png" for name in names)])  # no link leads the files out of the study
    settings = []
    for row in rows:
        if attack not in row["results"]:
            raise MiaError(f"study.analysis_params.attack {attack!r}: setting {row['setting']!r} has no such result ({', '.join(sorted(row['results']))}); add its attack to study.attacks")
        experiment = ExperimentDir(Path(row["experiment"]))
        targets = row["results"][attack]["targets"]
        utility = row.get("utility") or {}
        epsilon, delta = accountant_budget(experiment, targets)
        settings.append({
            "setting": row["setting"],
            "overrides": row["overrides"],
            "targets": len(targets),
            "test_accuracy": utility.get("test_accuracy"),
            "train_accuracy": utility.get("train_accuracy"),
            "train_test_gap": utility.get("train_test_gap"),
            "accountant_epsilon": epsilon,
            "accountant_delta": delta,
            "attacks": {o: e for o in outputs if (e := _attack_entry(row, o, levels_used)) is not None},
        })
        if dp_bounds and epsilon is not None:
            members, audited = _pairs(experiment, targets)
            scores, _ = output_scores(Path(row["run_folder"]), row["results"][attack], experiment.keep, setting_fix(experiment))
            settings[-1]["dp_bound"] = dp_roc(Path(study_dir), settings[-1], scores, members, audited, attack, levels_used)
    judged_by = {name: baselines.get(name, baseline) for name in names}
    for s in settings:
        s["baseline"] = judged_by[s["setting"]]
        own = s["setting"] == baseline or s["setting"] in judged_by.values()
        s["helps"] = "baseline" if own else verdict(s, settings[names.index(s["baseline"])], attack)
    plotted = [s for s in settings if s["test_accuracy"] is not None]
    front = pareto_front(np.array([s["test_accuracy"] for s in plotted]), np.array([s["attacks"][attack]["tpr@0.01"] for s in plotted]))
    for s, on_front in zip(plotted, front):
        s["pareto"] = bool(on_front)
    if plotted:
        plot_privacy_utility(plotted, attack, front, Path(study_dir) / PLOT_FILE)
    table = defence_table(settings, outputs, levels_used)
    print_tables([table], console)
    figures = [(Path(study_dir) / PLOT_FILE, "test accuracy against TPR@1%FPR per defence")]
    figures += [(Path(study_dir) / s["dp_bound"]["plot"], f"{attack} ROC of {s['setting']} against its DP bound") for s in settings if "dp_bound" in s]
    write_tables_page(confined(Path(study_dir), Path(study_dir) / ANALYSIS_PAGE), f"Defences study: {Path(study_dir).name}", [table], figures)
    return {"attack": attack, "baseline": baseline, "baselines": baselines, "plot": PLOT_FILE, "levels": list(levels_used),
            "helps_rule": "yes: the TPR@1%FPR bootstrap interval lies entirely below its baseline's; worse: entirely above; no: they overlap",
            "settings": settings}
