"""Few-shadow curve: rows, skipped counts, quiet logs, and the files it writes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from synthetic import synthetic_attack_data, write_synthetic_experiment

from mia_lightning.analysis.few_shadow import CURVE_OUTPUTS, few_shadow_curve
from mia_lightning.cli import attack_main
from mia_lightning.attacks import create_attack
from mia_lightning.metrics import membership_metrics

OUTPUTS = [name for names in CURVE_OUTPUTS.values() for name in names]


def test_rows_cover_every_count_and_output_and_stay_quiet(caplog):
    data = synthetic_attack_data(n_models=9, n_samples=60, n_population=6, seed=6)
    targets = np.array([0, 4, 8])
    with caplog.at_level(logging.DEBUG, logger="mia_lightning"):
        rows = few_shadow_curve(data, targets, shadow_counts=(1, 2, 4, 16))
    # 16 > n_models - 1 becomes 8: the curve ends at "all shadows"
    assert [(row["n_shadows"], row["attack"]) for row in rows] == [(k, name) for k in (1, 2, 4, 8) for name in OUTPUTS]
    assert all(set(row) == {"n_shadows", "attack", "n_scored", "auc", "tpr@0.001", "tpr@0.01"} for row in rows)
    one_shadow = {row["attack"]: row for row in rows if row["n_shadows"] == 1}
    assert one_shadow["lira_online"]["auc"] is None and one_shadow["lira_online"]["n_scored"] == 0  # never both IN and OUT
    assert one_shadow["rmia_online"]["n_scored"] == 3 * 54
    assert all(row["auc"] is not None for row in rows if row["n_shadows"] == 8)
    # one debug line per attack run; no per-fallback warnings
    assert len([r for r in caplog.records if r.getMessage().startswith("few-shadow")]) == 4 * len(CURVE_OUTPUTS)
    assert not [record for record in caplog.records if record.levelno >= logging.INFO]


def test_rows_equal_the_attack_with_that_many_shadows():
    data = synthetic_attack_data(n_models=7, n_samples=40, seed=7)
    targets = np.arange(7)
    rows = few_shadow_curve(data, targets, shadow_counts=(3,))
    attack = create_attack("rmia", n_shadows=3)
    attack.fit(data)
    expected = membership_metrics(attack.score(targets)["rmia_offline"], data.keep[targets])
    row = next(row for row in rows if row["attack"] == "rmia_offline")
    assert row["auc"] == pytest.approx(expected["auc"]) and row["tpr@0.01"] == pytest.approx(expected["tpr_at_fpr"]["0.01"])


def test_few_shadow_is_part_of_the_attack_run(tmp_path):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=30, seed=8)
    assert attack_main(["--experiment", str(root), "--attack", "lira", "--n_targets", "3", "--few_shadow", "--bootstrap", "0"]) == 0
    saved = json.loads((root / "attacks/few_shadow/few_shadow.json").read_text())
    run = json.loads((root / "attacks/run.json").read_text())
    assert (root / "attacks/few_shadow").resolve().parent.name == run["id"]  # written inside the published run
    assert saved["targets"] == [0, 1, 2]
    assert sorted({row["n_shadows"] for row in saved["rows"]}) == [1, 2, 4, 5]  # 8 .. 64 become n_models - 1 = 5
    assert (root / "attacks/few_shadow/few_shadow.png").read_bytes()[:4] == b"\x89PNG"


def test_the_curve_scores_the_audited_pairs_of_the_run(tmp_path):
    """With ``audit.npy`` (e.g. a disjoint-shadows plan audits only the target's half), the curve's all-shadows point is the run's result."""
    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=40, seed=9)
    audit = np.zeros((6, 40), dtype=bool)
    audit[:, :20] = True  # the other half is never audited
    np.save(root / "audit.npy", audit)
    assert attack_main(["--experiment", str(root), "--attack", "rmia", "--n_targets", "3", "--few_shadow", "--bootstrap", "0"]) == 0
    rows = json.loads((root / "attacks/few_shadow/few_shadow.json").read_text())["rows"]
    for name in ("rmia_online", "rmia_offline"):
        point = next(row for row in rows if row["attack"] == name and row["n_shadows"] == 5)
        result = json.loads((root / f"attacks/{name}/results.json").read_text())
        assert point["n_scored"] == result["n_members"] + result["n_nonmembers"] == 3 * 20
        assert point["auc"] == pytest.approx(result["auc"], abs=1e-12)


def test_reference_models_of_the_plan_cap_the_curve_instead_of_failing_the_run(tmp_path):
    """A plan's reference models (``info.reference_models``, e.g. the MLM recipe's public model) are never shadows: the curve ends below them."""
    root = write_synthetic_experiment(tmp_path / "exp", n_models=7, n_samples=30, seed=2)
    keep = np.load(root / "keep.npy")
    keep[6] = False
    np.save(root / "keep.npy", keep)
    (root / "plan.json").write_text(json.dumps({"version": 2, "info": {"reference_models": [6], "target_models": [0, 1, 2, 3, 4, 5]}}))
    assert attack_main(["--experiment", str(root), "--attack", "lira", "--n_targets", "3", "--few_shadow", "--bootstrap", "0"]) == 0
    rows = json.loads((root / "attacks/few_shadow/few_shadow.json").read_text())["rows"]
    assert sorted({row["n_shadows"] for row in rows}) == [1, 2, 4, 5]  # 6 candidates: at most 5 shadows
