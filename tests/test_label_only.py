"""Label-only attack: agreement counts by hand, the shadow-calibrated count ratio against a loop, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mia_lightning.attacks import create_attack
from mia_lightning.attacks.label_only import agreement_counts
from mia_lightning.attacks.module import score_targets
from mia_lightning.cli import attack_main
from tests.synthetic import synthetic_attack_data, write_synthetic_experiment


def test_agreement_counts_hand_computed():
    logits = np.array([[[[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]],   # sample 0, y = 0: queries say 0, 1, 0 (tie -> first) -> 2
                        [[0.0, 1.0], [0.0, 1.0], [5.0, 1.0]]]])  # sample 1, y = 1: 1, 1, 0 -> 2
    assert agreement_counts(logits, np.array([0, 1])).tolist() == [[2, 2]]
    assert agreement_counts(logits, np.array([1, 0])).tolist() == [[1, 1]]


def loop_label_only_lira(counts: np.ndarray, keep: np.ndarray, target: int, n_queries: int) -> np.ndarray:
    """Straightforward: per sample, the other models' counts split by membership, frequencies smoothed towards the pooled one."""
    scores = np.full(keep.shape[1], np.nan)
    for j in range(keep.shape[1]):
        others = [m for m in range(keep.shape[0]) if m != target]
        ins = [counts[m, j] for m in others if keep[m, j]]
        outs = [counts[m, j] for m in others if not keep[m, j]]
        if ins and outs:
            c = counts[target, j]
            pooled = (ins.count(c) + outs.count(c)) / (len(ins) + len(outs))
            p_in = (ins.count(c) + pooled) / (len(ins) + 1)
            p_out = (outs.count(c) + pooled) / (len(outs) + 1)
            scores[j] = 0.0 if pooled == 0 else np.log(p_in) - np.log(p_out)
    return scores


@pytest.mark.parametrize("n_models", [3, 8])
def test_label_only_matches_a_loop(n_models):
    data = synthetic_attack_data(n_models=n_models, n_samples=50, n_queries=4, n_classes=3, effect=0.8, seed=1)
    logits = np.asarray(data.logits[:])
    counts = agreement_counts(logits, data.labels)
    targets = np.arange(n_models)
    scores = score_targets(create_attack("label_only"), data, targets)
    assert np.array_equal(scores["label_only_agreement"], counts / 4)
    for t in targets:
        np.testing.assert_allclose(scores["label_only_lira"][t], loop_label_only_lira(counts, data.keep, t, 4), rtol=0, atol=1e-12, equal_nan=True)


def test_label_only_with_few_shadows_uses_the_lowest_ids():
    data = synthetic_attack_data(n_models=8, n_samples=40, n_queries=2, n_classes=3, seed=2)
    counts = agreement_counts(np.asarray(data.logits[:]), data.labels)
    scores = score_targets(create_attack("label_only", n_shadows=3), data, np.array([6]))["label_only_lira"][0]
    sub = np.array([0, 1, 2, 6])  # target 6 with shadows 0, 1, 2
    np.testing.assert_allclose(scores, loop_label_only_lira(counts[sub], data.keep[sub], 3, 2), atol=1e-12, equal_nan=True)


def test_a_sample_every_shadow_labels_alike_scores_zero():
    """Leave-one-out shifts |IN| by the target's own membership; the smoothing must not turn that into a score."""
    keep = np.array([[True], [True], [False], [False], [False]])
    counts = np.ones((5, 1), dtype=np.int64)
    for target in range(5):
        assert loop_label_only_lira(counts, keep, target, 1)[0] == 0.0
    data = synthetic_attack_data(n_models=5, n_samples=1)
    data.keep = keep
    logits = np.zeros((5, 1, 1, 4), dtype=np.float32)
    logits[..., data.labels[0]] = 1.0
    data.logits = type(data.logits).in_memory(logits)
    assert np.all(score_targets(create_attack("label_only"), data, np.arange(5))["label_only_lira"] == 0.0)


def test_cli_runs_label_only_and_all_includes_it(tmp_path):
    from mia_lightning.audit import resolve_attacks

    assert {"label_only", "quantile"} <= set(resolve_attacks(["all"], {})[0])
    experiment = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=80, n_queries=3, effect=2.0)
    assert attack_main(["--experiment", str(experiment), "--attack", "label_only", "--bootstrap", "0"]) == 0
    record = json.loads((experiment / "attacks" / "label_only_lira" / "results.json").read_text())
    assert record["family"] == "label_only" and record["params"]["n_queries"] == 3 and record["auc"] > 0.5
