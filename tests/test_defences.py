"""Defences analysis: the Pareto front and the helps? rule by hand, the table from audited experiments (their intervals the audit's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mia_lightning.analysis.defences import analyse, pareto_front, verdict
from mia_lightning.attacks.module import score_targets
from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import save_json_atomic
from mia_lightning.contract.runs import setting_fix
from mia_lightning.errors import MiaError
from mia_lightning.metrics import evaluate_scores
from synthetic import synthetic_arrays


def test_pareto_front_and_verdict_by_hand():
    accuracy = np.array([0.80, 0.78, 0.70, 0.75, 0.60])
    leakage = np.array([0.30, 0.10, 0.05, 0.20, 0.05])
    assert pareto_front(accuracy, leakage).tolist() == [True, True, True, False, False]  # 0.75/0.20 is beaten by 0.78/0.10, 0.60/0.05 by 0.70/0.05
    base = {"test_accuracy": 0.8, "attacks": {"a": {"tpr@0.01": 0.20, "tpr@0.01_ci": [0.18, 0.22], "bootstrap": True}}}
    lower = {"test_accuracy": 0.7, "attacks": {"a": {"tpr@0.01": 0.05, "tpr@0.01_ci": [0.04, 0.06], "bootstrap": True}}}
    overlap = {"test_accuracy": 0.8, "attacks": {"a": {"tpr@0.01": 0.19, "tpr@0.01_ci": [0.16, 0.185], "bootstrap": True}}}
    higher = {"test_accuracy": 0.8, "attacks": {"a": {"tpr@0.01": 0.30, "tpr@0.01_ci": [0.25, 0.35], "bootstrap": True}}}
    assert verdict(lower, base, "a") == "yes (TPR@1% -15.0 pts, acc -10.0 pts)"
    assert verdict(overlap, base, "a").startswith("no ")
    assert verdict(higher, base, "a").startswith("worse ")
    pairs_only = {"test_accuracy": 0.7, "attacks": {"a": {**lower["attacks"]["a"], "bootstrap": False}}}  # Clopper-Pearson over pairs: too narrow
    assert verdict(pairs_only, base, "a").startswith("n/a (no bootstrap interval")


def audited_experiment(root: Path, effect: float, dp_epsilon: float | None = None, dp_delta: float | None = None) -> dict:
    """A synthetic experiment audited by LiRA, written as a study row: results.json + scores.npy in its run folder, done.json metrics, utility."""
    keep, labels, logits, _ = synthetic_arrays(n_models=8, n_samples=600, n_classes=3, effect=effect, seed=1)
    np.save(root.mkdir(parents=True) or root / "keep.npy", keep)
    np.save(root / "labels.npy", labels)
    (root / "plan.json").write_text(json.dumps({"version": 3, "kind": "lira_half", "info": {}}))
    for m in range(8):
        folder = root / "models" / f"{m:04d}"
        folder.mkdir(parents=True)
        np.save(folder / "logits.npy", logits[m])
        dp = {"dp_epsilon": dp_epsilon, **({"dp_delta": dp_delta} if dp_delta is not None else {})} if dp_epsilon is not None else {}
        save_json_atomic(folder / "done.json", {"metrics": dp})  # as the farm writes it
    data = AttackData(keep=keep, labels=labels, logits=logits)
    targets = np.arange(4)
    results = {}
    for name, scores in score_targets(create_attack("lira"), data, targets).items():
        metrics, _ = evaluate_scores(scores, keep[targets], bootstrap=50)
        folder = root / "attacks" / "runs" / "study-run" / name
        folder.mkdir(parents=True)
        np.save(folder / "scores.npy", scores)
        results[name] = {"attack": name, **metrics, "targets": targets.tolist(), "empirical_epsilon": {"epsilon_lower_bound": 0.5}}
    accuracy = float((logits[:4, :, 0].argmax(-1) == labels).mean())
    return {"setting": root.name, "overrides": {}, "experiment": root, "run_folder": root / "attacks" / "runs" / "study-run", "results": results,
            "utility": {"test_accuracy": accuracy, "train_accuracy": 1.0, "train_test_gap": 1.0 - accuracy}}


def test_analysis_table_from_audited_settings(tmp_path, capsys):
    rows = [audited_experiment(tmp_path / "baseline", effect=6.0), audited_experiment(tmp_path / "dp", effect=0.0, dp_epsilon=7.9)]
    summary = analyse(tmp_path, rows, outputs=["lira_online", "lira_offline"])
    base, dp = summary["settings"]
    assert base["helps"] == "baseline" and dp["helps"].startswith("yes")  # no membership effect at all: leakage drops
    assert dp["accountant_epsilon"] == 7.9 and base["accountant_epsilon"] is None
    assert base["attacks"]["lira_online"]["auc"] > 0.8 and base["attacks"]["lira_online"]["auc_ci"][0] > 0.75
    assert base["attacks"]["lira_online"]["auc_ci"] == rows[0]["results"]["lira_online"]["auc_ci_bootstrap"]  # the audit's interval, not a second bootstrap
    assert abs(dp["attacks"]["lira_online"]["auc"] - 0.5) < 0.1
    assert (tmp_path / "privacy_utility.png").is_file()
    out = capsys.readouterr().out
    assert "helps?" in out and "7.90" in out
    page = (tmp_path / "analysis.html").read_text()  # the same table as a self-contained page, its plot inline
    assert "<script" not in page and page.count("data:image/png;base64,") == 1
    assert ">7.90</td>" in page and ">baseline</td>" in page and "(!) the FPR is below" in page
    with pytest.raises(MiaError, match="baseline 'none'"):
        analyse(tmp_path, rows, baseline="none")
    with pytest.raises(MiaError, match="no such result"):
        analyse(tmp_path, rows, attack="rmia_online")


def test_a_plot_linked_out_of_the_study_is_refused_before_anything_is_written(tmp_path):
    rows = [audited_experiment(tmp_path / "baseline", effect=6.0), audited_experiment(tmp_path / "dp", effect=0.0, dp_epsilon=7.9)]
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(b"not yours")
    (tmp_path / "privacy_utility.png").symlink_to(outside)
    with pytest.raises(MiaError, match="a symbolic link leading outside"):
        analyse(tmp_path, rows, outputs=["lira_online"])
    assert outside.read_bytes() == b"not yours" and not (tmp_path / "analysis.html").exists()


def test_a_setting_is_judged_against_its_own_familys_baseline(tmp_path):
    rows = [audited_experiment(tmp_path / "baseline", effect=0.0), audited_experiment(tmp_path / "other", effect=6.0),
            audited_experiment(tmp_path / "other_dp", effect=0.0, dp_epsilon=1.0)]
    summary = analyse(tmp_path, rows, outputs=["lira_online"], baselines={"other_dp": "other"})
    base, other, dp = summary["settings"]
    assert base["helps"] == other["helps"] == "baseline" and dp["baseline"] == "other"
    assert dp["helps"].startswith("yes")  # against the main baseline (no effect either) it would read "no"
    assert analyse(tmp_path, rows, outputs=["lira_online"])["settings"][2]["helps"].startswith("no")
    with pytest.raises(MiaError, match="baselines 'other_dp': 'missing'"):
        analyse(tmp_path, rows, baselines={"other_dp": "missing"})


@pytest.mark.parametrize("damage", ["truncated", "a target's row missing"])
def test_a_damaged_scores_file_is_a_one_line_error(damage, tmp_path):
    rows = [audited_experiment(tmp_path / "baseline", effect=6.0), audited_experiment(tmp_path / "dp", effect=0.0, dp_epsilon=7.9)]
    scores = rows[1]["run_folder"] / "lira_online" / "scores.npy"
    if damage == "truncated":
        scores.write_bytes(scores.read_bytes()[:100])
    else:
        np.save(scores, np.load(scores)[:-1])  # 3 rows for the run's 4 targets: the pairs would no longer line up
    reason = "unreadable attack scores .*" if damage == "truncated" else r"float64 array of shape \(3, 600\), expected floats of shape \(4, 600\).*"
    fix = setting_fix(ExperimentDir(Path(rows[1]["experiment"])))
    assert fix.startswith(f"delete {rows[1]['experiment']}")
    with pytest.raises(MiaError, match=rf"scores.npy: {reason}; {re.escape(fix)}$"):
        analyse(tmp_path, rows, outputs=["lira_online"], dp_bounds=True)


def reject(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_an_undefended_dp_setting_writes_strict_json(tmp_path, capsys):
    """DP-SGD without noise (eps = inf) used to put Infinity in done.json and analysis.json, which is not JSON: null there now, read back as inf."""
    rows = [audited_experiment(tmp_path / "baseline", effect=6.0), audited_experiment(tmp_path / "eps-inf", effect=6.0, dp_epsilon=float("inf"), dp_delta=1e-5),
            audited_experiment(tmp_path / "eps-1", effect=0.0, dp_epsilon=1.0, dp_delta=1e-5)]
    done = json.loads((tmp_path / "eps-inf/models/0000/done.json").read_text(), parse_constant=reject)
    assert done["metrics"] == {"dp_epsilon": None, "dp_delta": 1e-5}
    summary = analyse(tmp_path, rows, outputs=["lira_online"], dp_bounds=True)
    free = summary["settings"][1]
    assert free["accountant_epsilon"] == float("inf") and free["dp_bound"]["bounds"] == []  # read back as infinite: no DP bound drawn
    assert "inf" in capsys.readouterr().out
    save_json_atomic(tmp_path / "analysis.json", summary)  # as train.py study writes it
    written = json.loads((tmp_path / "analysis.json").read_text(), parse_constant=reject)
    settings = {s["setting"]: s for s in written["settings"]}
    assert settings["eps-inf"]["accountant_epsilon"] is None and settings["eps-inf"]["accountant_delta"] == 1e-5
    assert settings["baseline"]["accountant_epsilon"] is None and settings["baseline"]["accountant_delta"] is None
    assert settings["eps-1"]["accountant_epsilon"] == 1.0


def test_every_json_the_package_writes_is_strict(tmp_path):
    """NaN and +-inf anywhere in a payload (numpy floats too) become null; the text is RFC 8259 JSON."""
    path = tmp_path / "x.json"
    save_json_atomic(path, {"nan": float("nan"), "inf": [np.float64("inf"), -np.inf, 1.5], "nested": {"t": (np.nan, 2)}, "n": 3, "s": "inf"})
    assert json.loads(path.read_text(), parse_constant=reject) == {"nan": None, "inf": [None, None, 1.5], "nested": {"t": [None, 2]}, "n": 3, "s": "inf"}
