"""``train.py unlearning-report``: the unlearning tables of an experiment's latest attack run.

For the ``unlearning`` attack (Chen et al., ACM CCS 2021): AUC and TPR@1%FPR with their 95%
intervals from a two-way bootstrap over target originals and samples (the units the plan draws;
``unlearning.metrics.unit_metrics``) per feature construction, classifier, defence and view, beside the classic baselines with the same classifier, and DegCount / DegRate against the
classic attack on the original model. For ``ulira`` (Hayes et al., SaTML 2025): U-LiRA on exact
and inexact unlearning, the same test before unlearning, open-unlearning's privleak (from the
loss attack and from U-LiRA, the exactly unlearned models as the retrained reference) and the
leakage of the retained samples before and after unlearning. Also the held-out accuracy of the
original and unlearned versions. Writes ``unlearning_report.json`` and ``unlearning_report.md``
into the experiment; ``--markdown PATH`` also writes every given experiment's tables into one file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import ArgumentParser
from scipy.special import softmax

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import save_json_atomic, write_bytes_atomic
from mia_lightning.contract.runs import latest_run, output_scores, rerun_fix, run_results
from mia_lightning.contract.confine import confined_all
from mia_lightning.report.cells import UNRESOLVED, interval, percent, unresolved
from mia_lightning.report.files import refuse_folders
from mia_lightning.report.html import write_tables_page
from mia_lightning.report.markdown import markdown_table
from mia_lightning.report.table import TableRecord
from mia_lightning.report.terminal import print_tables
from mia_lightning.unlearning.contract import Unlearning, load_unlearning, version_members
from mia_lightning.unlearning.features import aggregate
from mia_lightning.unlearning.metrics import UNIT_REPLICATES, degradation, privleak, target_units, unit_metrics

FPR = "0.01"
CLASSIFIER = r"(?P<classifier>random_forest|decision_tree|logistic|mlp|rf|lr)"  # rf / lr: the names of runs made before the classifiers merged
CHEN = re.compile(r"^unlearning_(?P<feature>[a-z0-9_]+?)_" + CLASSIFIER + r"(?:__(?P<defence>label_only|temperature|rounding))?(?:__(?P<view>endpoints))?$")
CLASSIC = re.compile(r"^classic_(?P<side>original|unlearned)_" + CLASSIFIER + r"(?:__(?P<defence>label_only|temperature|rounding))?$")
INTERVALS = (f"95% intervals: two-way Poisson bootstrap over target originals x samples ({UNIT_REPLICATES} replicates), "
             "the units the plan draws; Clopper-Pearson over pairs only in the JSON, labelled as such")


def _metrics(folder: Path, record: dict, keep: np.ndarray, units: dict[int, int], fix: str) -> dict[str, Any]:
    """AUC and TPR@1%FPR of one output with their bootstrap intervals over target originals x samples; ``fix``: what a damaged scores.npy asks for."""
    scores, members = output_scores(folder, record, keep, fix)
    measured = unit_metrics(scores, members, record["targets"], units)
    return {"auc": measured["auc"], "auc_ci": measured["auc_ci_bootstrap"], "tpr@1%fpr": measured["tpr_at_fpr"][FPR],
            "tpr@1%fpr_ci": measured["tpr_at_fpr_ci_bootstrap"][FPR], "tpr@1%fpr_ci_clopper_pearson_pairs": measured["tpr_at_fpr_ci"][FPR],
            "n_members": measured["n_members"], "n_nonmembers": measured["n_nonmembers"], "n_target_originals": measured["n_units"],
            "min_resolvable_fpr": measured["min_resolvable_fpr"]}


def chen_rows(folder: Path, records: dict[str, dict], keep: np.ndarray, units: dict[int, int], fix: str) -> list[dict]:
    """One row per unlearning-attack output: its metrics, the baselines' AUCs and DegCount / DegRate against classic_original."""
    rows = []
    for name, record in records.items():
        match = CHEN.match(name)
        if not match:
            continue
        defence = match["defence"] or "none"
        suffix = "" if defence == "none" else f"__{defence}"
        row = {"attack": name, "feature": match["feature"], "classifier": match["classifier"], "defence": defence,
               "view": match["view"] or "steps", **_metrics(folder, record, keep, units, fix)}
        for side in ("original", "unlearned"):
            baseline = records.get(f"classic_{side}_{match['classifier']}{suffix}")
            if baseline is not None:
                row[f"classic_{side}_auc"] = baseline["auc"]
                row[f"classic_{side}_tpr@1%fpr"] = baseline["tpr_at_fpr"][FPR]
        classic = records.get(f"classic_original_{match['classifier']}{suffix}")
        if classic is not None:
            ours, members = output_scores(folder, record, keep, fix)
            theirs, _ = output_scores(folder, classic, keep, fix)
            row["degcount"], row["degrate"] = degradation(ours, theirs, members)
        rows.append(row)
    return rows


def classic_rows(folder: Path, records: dict[str, dict], keep: np.ndarray, units: dict[int, int], fix: str) -> list[dict]:
    """The classic baselines' metrics (one posterior, same classifiers)."""
    return [{"attack": name, **_metrics(folder, record, keep, units, fix)} for name, record in records.items() if CLASSIC.match(name)]


def ulira_summary(folder: Path, records: dict[str, dict], keep: np.ndarray, units: dict[int, int], fix: str) -> dict | None:
    """U-LiRA, privleak and retained-sample leakage from the ``ulira`` outputs (None when the run has none)."""
    if "ulira_exact" not in records:
        return None
    summary: dict[str, Any] = {name: _metrics(folder, records[name], keep, units, fix) for name in
                               ("ulira_exact", "ulira_inexact", "lira_before", "loss_exact", "loss_inexact", "retained_exact", "retained_inexact", "retained_before")
                               if name in records}
    summary["inexact_method"] = records["ulira_exact"]["params"].get("inexact_method")
    for statistic in ("loss", "ulira"):
        exact, inexact = summary.get(f"{statistic}_exact"), summary.get(f"{statistic}_inexact")
        if exact and inexact:
            summary[f"privleak_{statistic}"] = {"inexact": privleak(inexact["auc"], exact["auc"]), "exact_vs_chance": privleak(exact["auc"], 0.5)}
    return summary


def utility(experiment: ExperimentDir, unlearning: Unlearning, method: str, aggregation: str) -> dict[str, float]:
    """Mean held-out accuracy of the target chains' first and last versions (SISA versions answer with their aggregate)."""
    keep, labels = experiment.keep, experiment.labels
    outputs = experiment.load_model_outputs("logits")
    measured: dict[tuple[int, ...], float] = {}

    def held_out_accuracy(version: tuple[int, ...]) -> float:
        if version not in measured:
            held_out = ~version_members(keep, version)
            probs = softmax(np.stack([outputs.model(m)[held_out] for m in version]).astype(np.float64), axis=-1).mean(axis=2)
            measured[version] = float((aggregate(probs, aggregation).argmax(-1) == labels[held_out]).mean())
        return measured[version]

    targets = [chain for chain in unlearning.chains_of(method) if chain.role == "target"]
    if not targets:
        return {}
    return {"original": float(np.mean([held_out_accuracy(c.versions[0]) for c in targets])),
            "unlearned": float(np.mean([held_out_accuracy(c.versions[-1]) for c in targets]))}


def summarise(experiment_dir: Path) -> dict:
    """The unlearning report of the experiment's latest attack run, as a JSON-able dict."""
    experiment = ExperimentDir(Path(experiment_dir))
    experiment.check_exists()
    unlearning = load_unlearning(experiment)
    folder, run = latest_run(experiment)
    records, fix = run_results(folder, run), rerun_fix(folder, run)
    keep, units = experiment.keep, target_units(unlearning)
    chen = chen_rows(folder, records, keep, units, fix)
    if not chen and "ulira_exact" not in records:
        raise MiaError(f"{folder}: the latest run has no unlearning or ulira outputs; run `python attack.py --experiment {experiment.root} --attack unlearning ulira`")
    chen_params = next((records[r["attack"]]["params"] for r in chen), {})
    method = chen_params.get("method", unlearning.methods[0])
    aggregation = chen_params.get("aggregation", unlearning.aggregation)
    return {
        "experiment": str(experiment.root), "run": run.get("id"), "design": unlearning.design, "scenario": unlearning.scenario,
        "method": method, "evaluate": chen_params.get("evaluate", unlearning.evaluate), "aggregation": aggregation,
        "utility": utility(experiment, unlearning, method, aggregation), "unlearning_attack": chen, "classic": classic_rows(folder, records, keep, units, fix),
        "ulira": ulira_summary(folder, records, keep, units, fix),
        "intervals": INTERVALS,
    }


def _tpr(metrics: dict) -> str:
    """'16.0% [3.3%, 28.7%]' (the bootstrap interval), marked ``(!)`` like every other view when the scores cannot resolve a 1% FPR."""
    low, high = metrics["tpr@1%fpr_ci"]
    return f"{percent(metrics['tpr@1%fpr'], 1)} [{percent(low, 1)}, {percent(high, 1)}]" + (UNRESOLVED if unresolved(metrics, float(FPR)) else "")


LEFT = ("feature", "clf", "defence", "view", "test")


def tables(summary: dict) -> list[TableRecord]:
    """The report's tables, for the renderers of ``mia_lightning.report``."""
    name = Path(summary["experiment"]).name
    utility = summary["utility"]
    where = f"{name}: {summary['scenario']} / {summary['method']} (evaluated: {summary['evaluate']})"
    if utility:
        where += f"; held-out accuracy original {percent(utility.get('original'), 1)}, unlearned {percent(utility.get('unlearned'), 1)}"
    out = []
    if summary["unlearning_attack"]:
        header = ["feature", "clf", "defence", "view", "AUC [95% CI]", "TPR@1%FPR [95% CI]", "classic original AUC / TPR", "classic unlearned AUC / TPR", "DegCount", "DegRate"]
        rows = [[r["feature"], r["classifier"], r["defence"], r["view"], f"{r['auc']:.3f}" + interval(r["auc_ci"], "[]", 3, 1.0),
                 _tpr(r),
                 *(f"{r[f'classic_{side}_auc']:.3f} / {percent(r[f'classic_{side}_tpr@1%fpr'], 1)}" if f"classic_{side}_auc" in r else "-"
                   for side in ("original", "unlearned")),
                 f"{r['degcount']:.3f}" if "degcount" in r else "-", f"{r['degrate']:+.3f}" if "degrate" in r else "-"]
                for r in summary["unlearning_attack"]]
        out.append(TableRecord(f"unlearning attack (Chen et al. 2021) on {where}. {INTERVALS}", header, rows, LEFT))
    ulira = summary["ulira"]
    if ulira:
        header = ["test", "AUC [95% CI]", "TPR@1%FPR [95% CI]", "members / non"]
        labels = {"ulira_exact": "U-LiRA, exact (scratch)", "ulira_inexact": f"U-LiRA, inexact ({ulira['inexact_method']})",
                  "lira_before": "same test on the originals (before)", "loss_exact": "loss attack, exact", "loss_inexact": "loss attack, inexact",
                  "retained_before": "retained samples, originals", "retained_exact": "retained samples, exact", "retained_inexact": "retained samples, inexact"}
        rows = [[label, f"{ulira[key]['auc']:.3f}" + interval(ulira[key]["auc_ci"], "[]", 3, 1.0),
                 _tpr(ulira[key]),
                 f"{ulira[key]['n_members']} / {ulira[key]['n_nonmembers']}"] for key, label in labels.items() if key in ulira]
        for statistic in ("loss", "ulira"):
            leak = ulira.get(f"privleak_{statistic}")
            if leak:
                rows.append([f"privleak ({statistic}), inexact vs exact", f"{100 * leak['inexact']:+.1f}%", "", ""])
        out.append(TableRecord(f"U-LiRA (Hayes et al. 2025) on {name}. {INTERVALS}", header, rows, LEFT))
    return out


FIGURE_NOTE = ("Figure: attacks/roc.png, the ROC of the best output of each attack family and the baselines (log-log); "
               "every output: attacks/roc_all.png.")


def markdown(summary: dict) -> str:
    """The report's tables as Markdown, ending with where its figure is."""
    return "\n".join([*(markdown_table(record) for record in tables(summary)), FIGURE_NOTE, ""])


def main(argv: list[str]) -> int:
    """``train.py unlearning-report --experiment DIR [DIR ...] [--markdown PATH]``."""
    from mia_lightning.console import console, parse

    parser = ArgumentParser(prog="train.py unlearning-report", description="Unlearning tables (Chen et al. attack, DegCount/DegRate, U-LiRA, privleak) of the latest attack run.")
    parser.add_argument("--experiment", type=Path, nargs="+", required=True, help="one or more experiment directories")
    parser.add_argument("--markdown", type=Path | None, default=None, help="also write every experiment's tables into this Markdown file")
    cfg = parse(parser, argv)
    summaries = [summarise(path) for path in cfg.experiment]  # everything computed before anything is written
    destinations = [] if cfg.markdown is None else [cfg.markdown]
    for summary in summaries:  # no symlink leads a report out of its experiment
        root = Path(summary["experiment"])
        files = [root / "unlearning_report.json", root / "unlearning_report.md", root / "unlearning_report.html"]
        confined_all(root, files)
        destinations += files
    refuse_folders(destinations)  # every destination checked before any file is written
    for summary in summaries:
        root = Path(summary["experiment"])
        save_json_atomic(root / "unlearning_report.json", summary)
        write_tables_page(root / "unlearning_report.html", f"Unlearning audit: {root.name}", tables(summary),  # and its twin unlearning_report.md
                          [(root / "attacks" / "latest" / "roc.png", "ROC of the best output of each attack family and the baselines (log-log)")],
                          [FIGURE_NOTE])
        print_tables(tables(summary), console)
    if cfg.markdown:
        write_bytes_atomic(cfg.markdown, "\n".join(markdown(s) for s in summaries).encode())
    return 0
