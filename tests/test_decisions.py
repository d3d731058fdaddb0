"""User-level metrics and population-threshold decisions in every results.json (groups.npy / population.npy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import write_synthetic_experiment

from mia_lightning.audit import Decisions, run_audit
from mia_lightning.errors import MiaError
from mia_lightning.metrics import evaluate_scores


def user_grouped(root, n_models: int, n_users: int, per_user: int, population_users: int) -> np.ndarray:
    """Rewrite keep.npy so that membership is per user (users own consecutive samples); returns groups."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(n_users), per_user)
    audited_users = n_users - population_users
    user_keep = np.zeros((n_models, n_users), dtype=bool)
    user_keep[:, :audited_users] = np.argsort(rng.random((n_models, audited_users)), axis=0) < n_models // 2
    keep = user_keep[:, groups]
    np.save(root / "keep.npy", keep)
    np.save(root / "groups.npy", groups)
    np.save(root / "population.npy", np.flatnonzero(groups >= audited_users))
    return groups


def test_user_level_metrics_and_decisions(tmp_path):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=60, seed=5)
    groups = user_grouped(root, 8, 20, 3, population_users=4)
    result = run_audit(root, ["thresholds"], bootstrap=0, decisions=Decisions(fpr_budget=0.25))
    record = next(r for r in result.records if r["attack"] == "loss")
    scores = np.load(root / "attacks/loss/scores.npy")
    keep = np.load(root / "keep.npy")
    users = np.arange(16)
    mean_scores = np.stack([scores[:, groups == u].mean(axis=1) for u in users], axis=1)
    user_members = np.stack([keep[:, groups == u][:, 0] for u in users], axis=1)
    expected, _ = evaluate_scores(mean_scores, user_members)
    level = record["user_level"]
    assert level["n_users"] == 16 and level["reduce"] == "mean" and level["n_members"] == 8 * 8
    assert level["auc"] == pytest.approx(expected["auc"], abs=1e-12)
    decision = record["precision_recall"]
    assert decision["fpr_budget"] == 0.25 and decision["population_fpr"] <= 0.25
    assert decision["n_members"] + decision["n_nonmembers"] == 8 * 48
    assert level["precision_recall"]["population_fpr"] <= 0.25
    assert json.loads((root / "attacks/run.json").read_text())["decisions"]["fpr_budget"] == 0.25


def test_user_level_is_skipped_for_a_sample_level_plan(tmp_path):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=30, seed=6)
    np.save(root / "groups.npy", np.repeat(np.arange(10), 3))
    record = run_audit(root, ["lira"], bootstrap=0).records[0]
    assert "user-grouped plan" in record["user_level"]["skipped"]


def test_bad_decision_options():
    with pytest.raises(MiaError, match="--user_reduce 'sum'"):
        Decisions(user_reduce="sum")
    with pytest.raises(MiaError, match="--fpr_budget 1.5"):
        Decisions(fpr_budget=1.5)


def test_report_has_user_level_and_decision_sections(tmp_path):
    from mia_lightning.report.markdown import markdown_report

    root = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=60, seed=5)
    user_grouped(root, 8, 20, 3, population_users=4)
    run_audit(root, ["thresholds"], bootstrap=0)
    text = markdown_report(root)
    assert "## User level" in text and "## Decisions at a population threshold" in text and "| loss | user |" in text
