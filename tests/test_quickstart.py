"""End to end on the quickstart recipe: farm -> export -> LiRA, and leakage properties a user expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mia_lightning.cli import attack_main, train_main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/tabular/digits_quickstart.yaml"


def load_results(experiment: Path, name: str) -> dict:
    return json.loads((experiment / "attacks" / name / "results.json").read_text())


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Path:
    """The quickstart recipe exactly as `make demo` runs it (64 models), audited with LiRA."""
    root = tmp_path_factory.mktemp("quickstart")
    assert train_main(["farm", "--config", str(QUICKSTART), "--experiment.root", str(root), "--trainer.enable_progress_bar", "false"]) == 0
    experiment = root / "digits_quickstart"
    assert attack_main(["--experiment", str(experiment), "--attack", "lira"]) == 0
    return experiment


def test_online_lira_beats_the_global_threshold(quickstart):
    online, baseline = load_results(quickstart, "lira_online"), load_results(quickstart, "global_threshold")
    assert online["auc"] > baseline["auc"]
    assert online["tpr_at_fpr"]["0.001"] > baseline["tpr_at_fpr"]["0.001"]
    assert online["n_members"] == online["n_nonmembers"] == 64 * 1797 // 2


def lira_auc(root: Path, name: str, *overrides: str) -> float:
    args = ["farm", "--config", str(QUICKSTART), "--experiment.root", str(root), "--experiment.name", name,
            "--plan.n_models", "16", "--trainer.enable_progress_bar", "false", *overrides]
    assert train_main(args) == 0
    assert attack_main(["--experiment", str(root / name), "--attack", "lira"]) == 0
    return load_results(root / name, "lira_online")["auc"]


def test_an_overfit_model_leaks_more_than_a_regularised_one(tmp_path):
    overfit = lira_auc(tmp_path, "overfit", "--trainer.max_epochs", "60")
    regularised = lira_auc(tmp_path, "regularised", "--trainer.max_epochs", "8", "--model.init_args.weight_decay", "0.01", "--model.init_args.dropout", "0.5")
    assert overfit > regularised + 0.03, (overfit, regularised)


def test_rmia_with_two_references_matches_lira_offline_at_one_percent_fpr(quickstart):
    """RMIA's claim (Zarifzadeh et al. 2024): with 2 reference models it is at least as strong as offline LiRA."""
    from mia_lightning.analysis.few_shadow import few_shadow_curve
    from mia_lightning.attacks import AttackData
    from mia_lightning.contract.experiment import ExperimentDir

    data = AttackData.from_experiment(ExperimentDir(quickstart))
    rows = {row["attack"]: row for row in few_shadow_curve(data, np.arange(data.n_models), shadow_counts=(2,))}
    assert rows["rmia_offline"]["tpr@0.01"] >= rows["lira_offline"]["tpr@0.01"], rows
