"""End to end on a synthetic experiment: the attacks, empirical epsilon in results.json, few-shadow, report.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import write_synthetic_experiment

from mia_lightning.analysis.few_shadow import run_few_shadow
from mia_lightning.audit import run_audit
from mia_lightning.errors import MiaError
from mia_lightning.report_markdown import write_markdown_report


def test_audit_then_markdown_report(tmp_path):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=50, n_population=10, effect=2.0, seed=9)
    with pytest.raises(MiaError, match="no attack results"):
        write_markdown_report(root)
    records = run_audit(root, ["lira", "rmia", "reference"], n_targets=4)  # thresholds: unit-tested; each ROC plot costs ~0.2 s
    assert {"rmia_online", "rmia_offline", "reference_attack_r"} <= {record["attack"] for record in records}
    for record in records:
        eps = record["empirical_epsilon"]
        n_scored = 4 * 40 - record["n_unscored"]
        assert eps["epsilon_lower_bound"] >= 0.0 and sum(eps["counts"].values()) == n_scored - n_scored // 2  # evaluation half
        assert json.loads((root / "attacks" / record["attack"] / "results.json").read_text()) == record
    run_few_shadow(root, n_targets=4, shadow_counts=(2, 4))
    path = write_markdown_report(root)
    text = path.read_text()
    assert path == root / "report.md"
    for expected in ("## Attacks", "attacks/roc.png", "## Empirical epsilon", "## Few-shadow curve", "few_shadow.png", "## Most vulnerable samples", "lira_online"):
        assert expected in text
    table = [line for line in text.split("## Most vulnerable samples")[1].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 20
    ids = [int(line.split("|")[2]) for line in table]
    assert max(ids) < 40  # population samples (40..49) are reference data, never ranked
    scores = np.load(root / "attacks/lira_online/scores.npy")
    keep = np.load(root / "keep.npy")[:4]
    top = ids[0]
    assert np.nanmean(scores[keep[:, top], top]) == pytest.approx(max(np.nanmean(scores[keep[:, j], j]) for j in range(40) if keep[:, j].any()), rel=1e-6)
