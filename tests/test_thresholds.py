"""Threshold attacks against hand-computed values; attack R against a per-sample loop."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from synthetic import synthetic_arrays, synthetic_attack_data

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets


def test_thresholds_hand_computed():
    # one model, two samples; sample 0 has two queries with posteriors (0.7, 0.2, 0.1) and (0.5, 0.25, 0.25)
    logits = np.log(np.array([[[[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]], [[0.1, 0.3, 0.6], [0.1, 0.3, 0.6]]]]))
    data = AttackData(keep=np.array([[True, False]]), labels=np.array([0, 1]), logits=logits.astype(np.float32))
    got = create_attack("thresholds")
    got.fit(data)
    scores = got.score(np.array([0]))
    log = math.log
    loss0 = (log(0.7) + log(0.5)) / 2
    entropy0 = ((0.7 * log(0.7) + 0.2 * log(0.2) + 0.1 * log(0.1)) + (0.5 * log(0.5) + 2 * 0.25 * log(0.25))) / 2
    mentr0 = ((-0.3 * log(0.7) - 0.2 * log(0.8) - 0.1 * log(0.9)) + (-0.5 * log(0.5) - 2 * 0.25 * log(0.75))) / 2
    mentr1 = -0.7 * log(0.3) - 0.1 * log(0.9) - 0.6 * log(0.4)
    assert scores["loss"][0] == pytest.approx([loss0, log(0.3)], abs=1e-6)
    assert scores["confidence"][0] == pytest.approx([0.6, 0.3], abs=1e-6)
    assert scores["entropy"][0] == pytest.approx([entropy0, 0.1 * log(0.1) + 0.3 * log(0.3) + 0.6 * log(0.6)], abs=1e-6)
    assert scores["modified_entropy"][0] == pytest.approx([-mentr0, -mentr1], abs=1e-6)


def test_thresholds_are_finite_for_confident_models():
    logits = np.array([[[[1000.0, 0.0, -1000.0]], [[1000.0, 0.0, -1000.0]]]], dtype=np.float32)
    data = AttackData(keep=np.array([[True, False]]), labels=np.array([0, 1]), logits=logits)
    scores = score_targets(create_attack("thresholds"), data, np.array([0]))
    for name, values in scores.items():
        assert np.isfinite(values).all(), name
    assert scores["loss"][0, 0] == pytest.approx(0.0, abs=1e-12) and scores["loss"][0, 1] == pytest.approx(-1000.0)
    assert scores["modified_entropy"][0, 0] > scores["modified_entropy"][0, 1]


def reference_loop(data: AttackData, targets, n_shadows=None) -> tuple[np.ndarray, int]:
    """(fraction of OUT reference losses above the target's, ties counting half; number of ties met)."""
    M, n = data.keep.shape
    z = data.logits[:].astype(np.float64)
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    loss = -log_p[:, np.arange(n), :, data.labels].mean(-1).T
    out, ties = np.full((len(targets), n), np.nan), 0
    for ti, t in enumerate(targets):
        refs = [m for m in range(M) if m != t][: n_shadows or M]
        for j in range(n):
            losses = [loss[m, j] for m in refs if not data.keep[m, j]]
            ties += sum(v == loss[t, j] for v in losses)
            if losses:
                out[ti, j] = sum(1.0 if v > loss[t, j] else 0.5 if v == loss[t, j] else 0.0 for v in losses) / len(losses)
    return out, ties


@pytest.mark.parametrize("n_shadows", [None, 3])
def test_attack_r_matches_loop_with_ties(n_shadows):
    keep, labels, logits, _ = synthetic_arrays(n_models=7, n_samples=40, n_queries=2, seed=4)
    for copy, source, samples in ((3, 0, slice(0, 20)), (1, 2, slice(20, 40)), (6, 1, slice(0, 10))):
        logits[copy, samples] = logits[source, samples]  # tied losses between a target and a reference
    data = AttackData(keep=keep, labels=labels, logits=logits)
    targets = np.array([0, 2, 6])
    got = score_targets(create_attack("reference", n_shadows=n_shadows), data, targets, batch_size=2)["reference_attack_r"]
    want, ties = reference_loop(data, targets, n_shadows)
    assert ties > 0
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_attack_r_without_out_reference_warns(caplog):
    data = synthetic_attack_data(n_models=4, n_samples=20, seed=5)
    data.keep[:, 3] = [False, True, True, True]
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        got = score_targets(create_attack("reference"), data, np.array([0, 1]))["reference_attack_r"]
    assert np.isnan(got[0, 3]) and np.isfinite(got[1, 3])
    assert "attack R: 1 samples have no OUT reference" in caplog.text
