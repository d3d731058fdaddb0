"""A Markdown audit report of one experiment, ``<experiment>/report.md``, built from ONE attack run (the latest).

Sections: the attack comparison (AUC, balanced accuracy, TPR@FPR with Clopper-Pearson and two-way
bootstrap 95% intervals, empirical epsilon lower bound), the ROC plot, the empirical epsilon, the
few-shadow curve when the run has one, and the most vulnerable samples. Only reads the run's files,
``keep.npy``, ``labels.npy`` and ``population.npy``, so it can be re-rendered at any time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.metrics import FPR_LEVELS
from mia_lightning.report.table import TableRecord
from mia_lightning.report.cells import FEW_SHADOW_KEY, auc_cell, few_shadow_table, interval_key, results_header, results_row, tpr_cell, utility_line
from mia_lightning.report.terminal import DECISION_COLUMNS, decision_rows, skipped_lines, user_level_records
from mia_lightning.contract.runs import FEW_SHADOW_FILE, SCORES_FILE, UTILITY_FILE, latest_run, output_scores, rerun_fix, run_few_shadow, run_results, run_utility

VULNERABILITY_ATTACK = "lira_online"
"""Preferred attack for the per-sample ranking; otherwise the one with the best TPR@0.1%FPR (then AUC)."""


def _cell(text: str) -> str:
    """A table cell's text with ``|`` escaped and line breaks as spaces (a setting or scenario name holding one split its row)."""
    return " ".join(str(text).split("\n")).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]


def markdown_table(record: TableRecord) -> str:
    """A ``TableRecord`` as Markdown: the title in bold, the table, a blank line."""
    return "\n".join([f"**{record.title}**", "", *_table(record.header, record.rows), ""])


def load_records(run_folder: Path, run: dict) -> list[dict]:
    """The checked results.json of every output of one run (each with a TPR at every reported FPR level), in the run's order."""
    records = list(run_results(run_folder, run, FPR_LEVELS).values())
    if not records:
        raise MiaError(f"{run_folder}: the run has no attack results; run `python attack.py --experiment ...` with an attack")
    return records


def _user_and_decision_sections(records: list[dict]) -> list[str]:
    """User-level metrics (records with groups) and precision/recall at the population threshold, as Markdown tables."""
    lines: list[str] = []
    users = user_level_records(records)
    if users:
        rows = [[r["attack"], str(r["n_users"]), auc_cell(r), *(tpr_cell(r, level) for level in FPR_LEVELS)] for r in users]
        lines += ["## User level", "", f"A user's score is the {users[0]['reduce']} of their samples' scores; metrics count users.", "",
                  *_table(["attack", "users", "AUC {bootstrap}"] + [f"TPR@{100 * level:g}%FPR {{bootstrap}}" for level in FPR_LEVELS], rows),
                  "", interval_key(users), ""]
    rows = decision_rows(records)
    if rows:
        lines += ["## Decisions at a population threshold", "", "The threshold flags at most the FPR budget of known non-members (the population).", "",
                  *_table(list(DECISION_COLUMNS), rows), ""]
    return lines


def _attack_section(records: list[dict], run_folder: Path, link: str) -> list[str]:
    rows = [results_row(record) for record in records]
    lines = ["## Attacks", "", *_table(results_header(), rows), "", interval_key(records), ""]
    if (run_folder / "roc.png").is_file():
        lines += [f"![ROC curves: the best output of each attack family and the baselines (log-log)]({link}/roc.png)", ""]
    if (run_folder / "roc_all.png").is_file():
        lines += [f"Every output's curve: [roc_all.png]({link}/roc_all.png).", ""]
    return lines


def epsilon_paragraphs(records: list[dict]) -> list[str]:
    """What the empirical epsilon of a run says, as plain sentences (the largest bound, its statement, joint confidence, the accountant's epsilon)."""
    audited = [r for r in records if (r.get("empirical_epsilon") or {}).get("epsilon_lower_bound") is not None]
    if not audited:
        reasons = {(r.get("empirical_epsilon") or {}).get("reason") for r in records} - {None}
        return [f"No valid lower bound could be computed: {'; '.join(sorted(reasons)) or 'no attack output carries one'}."]
    best = max(audited, key=lambda record: record["empirical_epsilon"]["epsilon_lower_bound"])
    eps = best["empirical_epsilon"]
    paragraphs = [
        f"Largest lower bound: {eps['epsilon_lower_bound']:.3f} ({best['attack']}; delta = {eps['delta']:g}, "
        f"confidence {100 * eps['confidence']:g}%, {eps.get('n_trials', '?')} independent trials, method {eps.get('method')}).",
        eps.get("statement", ""),
        f"Each output's bound holds at {100 * eps['confidence']:g}% on its own; the largest of {len(audited)} holds at "
        f"{100 * (1 - len(audited) * (1 - eps['confidence'])):.0f}% jointly (Bonferroni). Constructions and their assumptions: docs/epsilon.md.",
    ]
    theoretical = [r["empirical_epsilon"]["theoretical_epsilon"] for r in audited if "theoretical_epsilon" in r["empirical_epsilon"]]
    if theoretical:
        paragraphs.append(
            f"The DP accountant's epsilon of the training run is {theoretical[0]:g} (add/remove neighbours). On a plan with equal-size "
            "training sets the bound above is for replace-one neighbours, which an add/remove (eps, delta) guarantee implies at "
            "(2 eps, (1 + e^eps) delta); a bound above that would mean a broken DP implementation."
        )
    return [paragraph for paragraph in paragraphs if paragraph]


def _epsilon_section(records: list[dict]) -> list[str]:
    lines = ["## Empirical epsilon", ""]
    for paragraph in epsilon_paragraphs(records):
        lines += [paragraph, ""]
    return lines


def _few_shadow_section(run_folder: Path, link: str, fix: str) -> list[str]:
    rows = run_few_shadow(run_folder, fix)
    if rows is None:
        return []
    folder = (run_folder / FEW_SHADOW_FILE).parent
    lines = ["## Few-shadow curve", "", f"{FEW_SHADOW_KEY}.", ""]
    lines += _table(*few_shadow_table(rows)) + [""]
    if (folder / "few_shadow.png").is_file():
        lines += [f"![Attack success against the number of shadow models]({link}/few_shadow/few_shadow.png)", ""]
    return lines


def vulnerable_samples(records: list[dict], experiment: ExperimentDir, run_folder: Path, top: int, fix: str) -> tuple[str, list[list[str]]]:
    """(attack output used, rows of rank, sample, label, mean score as member (targets), mean as non-member (targets)).

    Samples are ranked by their mean score over the target models that trained on them; population
    samples (reference data no model trains on) are never ranked, and only audited pairs count (``audit.npy``,
    as in the metrics). No rows when the run kept no scores. ``fix``: what a damaged scores.npy asks for.
    """
    by_name = {record["attack"]: record for record in records}
    source = by_name.get(VULNERABILITY_ATTACK) or max(records, key=lambda r: (r["tpr_at_fpr"]["0.001"], r["auc"]))
    if not (run_folder / source["attack"] / SCORES_FILE).is_file():
        return source["attack"], []
    scores, member = output_scores(run_folder, source, experiment.keep, fix)
    scored = np.isfinite(scores)
    if experiment.audit is not None:
        scored &= experiment.audit[source["targets"]]
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
    return source["attack"], [
        [str(rank), str(j), str(labels[j]), f"{member_mean[j]:.4g} ({as_member[:, j].sum()})", f"{nonmember_mean[j]:.4g} ({as_nonmember[:, j].sum()})"]
        for rank, j in enumerate(ids, start=1)
    ]


VULNERABLE_COLUMNS = ["rank", "sample", "label", "mean score as member", "mean score as non-member"]


def _vulnerable_section(records: list[dict], experiment: ExperimentDir, run_folder: Path, top: int, fix: str) -> list[str]:
    source, rows = vulnerable_samples(records, experiment, run_folder, top, fix)
    if not rows:
        return []
    return [
        "## Most vulnerable samples",
        "",
        f"Top {len(rows)} by the mean {source} score over the target models that trained on the sample "
        "(number of such targets in brackets), beside the mean over the targets that did not.",
        "",
        *_table(VULNERABLE_COLUMNS, rows),
        "",
    ]


def markdown_report(experiment_dir: Path, top: int = 20) -> str:
    """The text of ``<experiment>/report.md``, rendered from the latest attack run (``report.files.write_reports`` writes it)."""
    experiment = ExperimentDir(Path(experiment_dir))
    experiment.check_exists()
    run_folder, run = latest_run(experiment)
    records, fix = load_records(run_folder, run), rerun_fix(run_folder, run)
    link = f"attacks/runs/{run_folder.name}"
    n_models, n_samples = experiment.keep.shape
    population = experiment.population
    pool = f"{n_models} models, {n_samples} samples" + ("" if population is None else f" ({population.size} population samples, not audited)")
    lines = [
        f"# Membership inference audit: {experiment.root.name}",
        "",
        f"{pool}; {len(records[0]['targets'])} target models, scored leave-one-out. Everything below comes from attack run "
        f"`{run['id']}` (started {run.get('started')}, mia-lightning {run.get('version')}; files in `{link}/`).",
        "",
    ]
    if run.get("skipped"):
        lines += ["Not applicable to this experiment (skipped): " + "; ".join(skipped_lines(run["skipped"])) + ".", ""]
    utility = run_utility(run_folder, fix)
    if utility is not None:
        lines += [utility_line(utility) + f" (held-out = pool samples a model did not train on; `{link}/{UTILITY_FILE}`).", ""]
    lines += _attack_section(records, run_folder, link)
    lines += _user_and_decision_sections(records)
    lines += _epsilon_section(records)
    lines += _few_shadow_section(run_folder, link, fix)
    lines += _vulnerable_section(records, experiment, run_folder, top, fix)
    return "\n".join(lines)
