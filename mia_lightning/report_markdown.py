"""A Markdown audit report of one experiment, ``<experiment>/report.md``, from the files the attack stage wrote.

Sections: the attack comparison (AUC, balanced accuracy, TPR@FPR with Clopper-Pearson 95%
intervals, empirical epsilon lower bound), the ROC plot, the empirical epsilon, the few-shadow curve
when ``attacks/few_shadow/`` exists, and the most vulnerable samples. Only reads ``attacks/*``,
``keep.npy``, ``labels.npy`` and ``population.npy``, so it can be re-rendered at any time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.experiment import ExperimentDir
from mia_lightning.io import load_json, load_npy, write_bytes_atomic
from mia_lightning.metrics import FPR_LEVELS

VULNERABILITY_ATTACK = "lira_online"
"""Preferred attack for the per-sample ranking; otherwise the one with the best TPR@0.1%FPR (then AUC)."""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def load_records(experiment: ExperimentDir) -> list[dict]:
    """Every ``attacks/<name>/results.json``, in folder-name order."""
    paths = sorted(experiment.attacks_dir.glob("*/results.json"))
    if not paths:
        raise MiaError(f"{experiment.attacks_dir}: no attack results; run `python attack.py --experiment {experiment.root}` first")
    return [load_json(path) for path in paths]


def _attack_section(records: list[dict], experiment: ExperimentDir) -> list[str]:
    header = ["attack", "AUC", "bal. acc"] + [f"TPR@{100 * level:g}%FPR [95% CI]" for level in FPR_LEVELS]
    header += ["eps lower bound", "members / non"]
    rows = []
    for record in records:
        cells = [record["attack"], f"{record['auc']:.4f}", f"{record['balanced_accuracy']:.4f}"]
        for level in FPR_LEVELS:
            low, high = record["tpr_at_fpr_ci"][str(level)]
            cells.append(f"{_pct(record['tpr_at_fpr'][str(level)])} [{_pct(low)}, {_pct(high)}]")
        eps = record.get("empirical_epsilon", {}).get("epsilon_lower_bound")
        cells += ["-" if eps is None else f"{eps:.3f}", f"{record['n_members']} / {record['n_nonmembers']}"]
        rows.append(cells)
    lines = ["## Attacks", "", *_table(header, rows), ""]
    if (experiment.attacks_dir / "roc.png").is_file():
        lines += ["![ROC curves of all attacks (log-log)](attacks/roc.png)", ""]
    return lines


def _epsilon_section(records: list[dict]) -> list[str]:
    audited = [record for record in records if "empirical_epsilon" in record]
    if not audited:
        return []
    best = max(audited, key=lambda record: record["empirical_epsilon"]["epsilon_lower_bound"])
    eps = best["empirical_epsilon"]
    counts = ", ".join(f"{key.upper()} {value}" for key, value in eps["counts"].items())
    lines = [
        "## Empirical epsilon",
        "",
        f"Largest lower bound: **{eps['epsilon_lower_bound']:.3f}** ({best['attack']}; delta = {eps['delta']:g}, "
        f"one-sided {100 * eps['confidence']:g}% Clopper-Pearson bounds; threshold chosen on a seeded half of the "
        f"(target, sample) pairs, counts from the other half: {counts}). Each attack's bound holds at "
        f"{100 * eps['confidence']:g}% on its own; the largest of {len(audited)} holds at a lower joint confidence.",
    ]
    theoretical = [record["empirical_epsilon"]["theoretical_epsilon"] for record in audited if "theoretical_epsilon" in record["empirical_epsilon"]]
    if theoretical:
        lines.append(f"The DP accountant's epsilon of the training run is {theoretical[0]:g}; an empirical bound above it would mean a broken DP implementation.")
    return lines + [""]


def _few_shadow_section(experiment: ExperimentDir) -> list[str]:
    folder = experiment.attack_dir("few_shadow")
    if not (folder / "few_shadow.json").is_file():
        return []
    rows = load_json(folder / "few_shadow.json")["rows"]
    names = list(dict.fromkeys(row["attack"] for row in rows))
    counts = sorted({row["n_shadows"] for row in rows})
    cell = {(row["n_shadows"], row["attack"]): row for row in rows}
    table = []
    for k in counts:
        points = [cell.get((k, name)) for name in names]
        table.append([str(k)] + ["-" if p is None or p["auc"] is None else f"{p['auc']:.3f} / {_pct(p['tpr@0.001'])} / {_pct(p['tpr@0.01'])}" for p in points])
    lines = ["## Few-shadow curve", "", "AUC / TPR@0.1%FPR / TPR@1%FPR with k shadow / reference models (the k lowest ids other than the target).", ""]
    lines += _table(["shadows"] + names, table) + [""]
    if (folder / "few_shadow.png").is_file():
        lines += ["![Attack success against the number of shadow models](attacks/few_shadow/few_shadow.png)", ""]
    return lines


def _vulnerable_section(records: list[dict], experiment: ExperimentDir, top: int) -> list[str]:
    by_name = {record["attack"]: record for record in records}
    source = by_name.get(VULNERABILITY_ATTACK) or max(records, key=lambda r: (r["tpr_at_fpr"]["0.001"], r["auc"]))
    path = experiment.attack_dir(source["attack"]) / "scores.npy"
    if not path.is_file():
        return []
    scores = load_npy(path, "attack scores", "re-run the attack")
    member = experiment.keep[source["targets"]]
    scored = np.isfinite(scores)
    as_member, as_nonmember = scored & member, scored & ~member
    with np.errstate(invalid="ignore", divide="ignore"):
        member_mean = np.where(as_member, scores, 0.0).sum(axis=0) / as_member.sum(axis=0)
        nonmember_mean = np.where(as_nonmember, scores, 0.0).sum(axis=0) / as_nonmember.sum(axis=0)
    candidates = np.isfinite(member_mean)
    if experiment.population is not None:
        candidates[experiment.population] = False
    ids = np.flatnonzero(candidates)
    ids = ids[np.argsort(-member_mean[ids], kind="stable")][:top]
    labels = experiment.labels
    rows = [
        [str(rank), str(j), str(labels[j]), f"{member_mean[j]:.4g} ({as_member[:, j].sum()})", f"{nonmember_mean[j]:.4g} ({as_nonmember[:, j].sum()})"]
        for rank, j in enumerate(ids, start=1)
    ]
    return [
        "## Most vulnerable samples",
        "",
        f"Top {len(ids)} by the mean {source['attack']} score over the target models that trained on the sample "
        "(number of such targets in brackets), beside the mean over the targets that did not.",
        "",
        *_table(["rank", "sample", "label", "mean score as member", "mean score as non-member"], rows),
        "",
    ]


def write_markdown_report(experiment_dir: Path, top: int = 20) -> Path:
    """Render ``<experiment>/report.md`` (atomically) from the attack results; returns its path."""
    experiment = ExperimentDir(Path(experiment_dir))
    experiment.check_exists()
    records = load_records(experiment)
    n_models, n_samples = experiment.keep.shape
    population = experiment.population
    pool = f"{n_models} models, {n_samples} samples" + ("" if population is None else f" ({population.size} population samples, not audited)")
    lines = [f"# Membership inference audit: {experiment.root.name}", "", f"{pool}; {len(records[0]['targets'])} target models, scored leave-one-out.", ""]
    lines += _attack_section(records, experiment)
    lines += _epsilon_section(records)
    lines += _few_shadow_section(experiment)
    lines += _vulnerable_section(records, experiment, top)
    path = experiment.root / "report.md"
    write_bytes_atomic(path, "\n".join(lines).encode())
    return path
