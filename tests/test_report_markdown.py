"""End to end on a synthetic experiment: one attack run (attacks, empirical epsilon, few-shadow), then report.md from it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from synthetic import write_synthetic_experiment

from mia_lightning.audit import run_audit
from mia_lightning.errors import MiaError
from mia_lightning.report.files import write_reports
from mia_lightning.report.markdown import markdown_report


def test_audit_then_markdown_report(tmp_path):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=50, n_population=10, effect=2.0, seed=9)
    with pytest.raises(MiaError, match="no published attack run"):
        write_reports(root)
    assert not (root / "report.md").exists()
    result = run_audit(root, ["lira", "rmia", "reference"], n_targets=4, few_shadow=True)  # thresholds: unit-tested; each ROC plot costs ~0.2 s
    records = result.records
    assert {"rmia_online", "rmia_offline", "reference_attack_r"} <= {record["attack"] for record in records}
    for record in records:
        eps = record["empirical_epsilon"]
        assert eps["method"] == "independent_runs" and eps["epsilon_lower_bound"] >= 0.0
        assert eps["n_trials"] == 3  # models 0..3 choose the test; models 5..7 evaluate it (model 4 is a shadow of both)
        assert json.loads((root / "attacks" / record["attack"] / "results.json").read_text()) == record
        assert record["run"]["id"] == result.run_id and record["run"]["targets"] == [0, 1, 2, 3]
        low, high = record["auc_ci_bootstrap"]  # every results.json carries the AUC's two-way bootstrap interval
        assert low <= record["auc"] <= high and record["auc_bootstrap_replicates"] > 0
    path = write_reports(root)["markdown"]
    text = path.read_text()
    assert path == root / "report.md"
    link = f"attacks/runs/{result.run_id}"
    for expected in (f"run `{result.run_id}`", "## Attacks", f"{link}/roc.png", "## Empirical epsilon", "## Few-shadow curve",
                     f"{link}/few_shadow/few_shadow.png", "## Most vulnerable samples", "lira_online", "{bootstrap}", f"{records[0]['auc']:.4f} {{{records[0]['auc_ci_bootstrap'][0]:.4f}"):
        assert expected in text, expected
    table = [line for line in text.split("## Most vulnerable samples")[1].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 20
    ids = [int(line.split("|")[2]) for line in table]
    assert max(ids) < 40  # population samples (40..49) are reference data, never ranked
    scores = np.load(root / "attacks/lira_online/scores.npy")
    keep = np.load(root / "keep.npy")[:4]
    top = ids[0]
    assert np.nanmean(scores[keep[:, top], top]) == pytest.approx(max(np.nanmean(scores[keep[:, j], j]) for j in range(40) if keep[:, j].any()), rel=1e-6)


def test_unresolved_fprs_are_flagged_alike_in_the_terminal_and_report_md(tmp_path):
    """RMIA on a 10-sample population cannot resolve 0.1% FPR: every view marks that cell and the min FPR with (!) and explains it."""
    from rich.console import Console

    from mia_lightning.report.cells import interval_key
    from mia_lightning.report.terminal import results_table

    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=40, n_population=10, effect=2.0, seed=3)
    records = run_audit(root, ["rmia"], n_targets=3, bootstrap=20).records
    rmia = next(record for record in records if record["attack"] == "rmia_online")
    assert rmia["min_resolvable_fpr"] > 0.001
    row = next(line for line in markdown_report(root).splitlines() if line.startswith("| rmia_online |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3].endswith(" (!)") and cells[-1].endswith("% (!)") and not cells[5].endswith("(!)")  # 0.1% flagged, 10% resolved
    assert sum(cell.endswith(" (!)") for cell in cells[3:6]) == sum(level < rmia["min_resolvable_fpr"] for level in (0.001, 0.01, 0.1))
    key = interval_key(records)
    assert key.startswith("{ } two-way bootstrap 95% over targets x samples (AUC too)")
    assert key in markdown_report(root) and "[" not in row  # no Clopper-Pearson interval in any view
    console = Console(width=400, record=True)
    console.print(results_table(records, "t"))
    terminal = console.export_text()
    line = next(line for line in terminal.splitlines() if "rmia_online" in line)
    unresolved_levels = sum(level < rmia["min_resolvable_fpr"] for level in (0.001, 0.01, 0.1))
    assert line.count("(!)") == unresolved_levels + 1 and "[" not in line  # those TPR cells and min FPR
    assert " ".join(key.split()[:10]) in " ".join(terminal.split())


def test_a_pipe_or_line_break_in_a_cell_keeps_the_markdown_table_shape():
    """A setting named 'l2|0.1' (study names allow it) or a multi-line cell split its row in analysis.md."""
    from mia_lightning.report.markdown import markdown_table
    from mia_lightning.report.table import TableRecord

    text = markdown_table(TableRecord("t", ["setting", "AUC"], [["l2|0.1", "0.61"], ["two\nlines", "0.5"]]))
    assert text.splitlines()[2:] == ["| setting | AUC |", "|---|---|", "| l2\\|0.1 | 0.61 |", "| two lines | 0.5 |"]


def test_vulnerable_samples_count_only_audited_pairs(tmp_path):
    """With ``audit.npy`` the mean scores cover the audited pairs only, as every metric of the run does."""
    from mia_lightning.contract.experiment import ExperimentDir
    from mia_lightning.contract.runs import latest_run
    from mia_lightning.report.markdown import vulnerable_samples

    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=40, seed=4)
    audit = np.ones((6, 40), dtype=bool)
    audit[:, 20:] = False  # the second half is never audited
    np.save(root / "audit.npy", audit)
    records = run_audit(root, ["lira"], n_targets=3, bootstrap=0).records
    experiment = ExperimentDir(root)
    _, rows = vulnerable_samples(records, experiment, latest_run(experiment)[0], top=40, fix="re-run")
    assert rows and all(int(row[1]) < 20 for row in rows)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A synthetic experiment with one published thresholds run and its report.md / report.html."""
    from mia_lightning.cli import attack_main

    root = write_synthetic_experiment(tmp_path_factory.mktemp("reported") / "exp", n_models=6, n_samples=30, seed=4)
    run_audit(root, ["thresholds"], n_targets=3, bootstrap=10)
    assert attack_main(["--experiment", str(root), "--report"]) == 0
    return root


@pytest.mark.parametrize("file, edit, fragment", [
    ("loss/results.json", {"auc": "high"}, 'auc is "high", expected a number'),
    ("loss/results.json", {"auc": None}, "auc is null, expected a number"),
    ("loss/results.json", {"tpr_at_fpr": None}, "tpr_at_fpr is null, expected an object"),
    ("loss/results.json", {"tpr_at_fpr": {"abc": 0.5}}, 'tpr_at_fpr is {"abc": 0.5}, expected an object of a number at FPR levels'),
    ("loss/results.json", {"tpr_at_fpr": {"0.01": 0.1, "0.1": 0.2}}, "expected an object of a number at FPR levels 0.001, 0.01, 0.1"),
    ("loss/results.json", {"auc_ci_bootstrap": [0.4]}, "auc_ci_bootstrap is [0.4], expected a [low, high] pair of numbers or null"),
    ("loss/results.json", {"empirical_epsilon": "x"}, 'empirical_epsilon is "x", expected an object or null'),
    ("loss/results.json", {"targets": 5}, "targets is 5, expected a non-empty list of model ids"),
    ("loss/results.json", {"targets": [0, 1, 99]}, "targets name model 99, but keep.npy has 6 models"),
    ("run.json", {"skipped": [1]}, 'skipped is [1], expected a list of objects {"attack": ..., "reason": ...}'),
    ("utility.json", {"test_accuracy": "x"}, 'test_accuracy is "x", expected a number or null'),
    ("utility.json", [], "holds [], expected an object"),
])
def test_a_hand_edited_run_file_is_one_line_naming_the_field_and_the_report_is_kept(reported, tmp_path, capsys, file, edit, fragment):
    """A run file that does not hold what attack.py writes: --report and records() refuse it in one line naming the run's attack.py command; report.md / .html stay as they were."""
    import shutil

    from mia_lightning import open_experiment
    from mia_lightning.cli import attack_main

    root = tmp_path / "exp"
    shutil.copytree(reported, root, symlinks=True)
    path = (root / "attacks" / "latest" / file).resolve()
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, **edit} if isinstance(edit, dict) else edit))
    before = {name: (root / name).read_bytes() for name in ("report.md", "report.html")}
    assert attack_main(["--experiment", str(root), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {path}: " in err
    command = f"re-run `python attack.py --experiment {root.resolve()} --attack thresholds --n_targets 3 --bootstrap 10`"
    assert fragment in err and err.rstrip().endswith(command), err
    assert {name: (root / name).read_bytes() for name in before} == before
    if "keep.npy" not in fragment:  # the API reads no scores
        with pytest.raises(MiaError, match=f"{re.escape(command)}$"):
            open_experiment(root).records()


def test_a_results_file_that_is_not_json_names_the_attack_command_that_rewrites_it(reported, tmp_path, capsys):
    import shutil

    from mia_lightning.cli import attack_main

    root = tmp_path / "exp"
    shutil.copytree(reported, root, symlinks=True)
    path = (root / "attacks" / "loss" / "results.json").resolve()
    path.write_text("{")
    assert attack_main(["--experiment", str(root), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {path}: not valid JSON" in err
    assert err.rstrip().endswith(f"re-run `python attack.py --experiment {root.resolve()} --attack thresholds --n_targets 3 --bootstrap 10`"), err
