"""The memory-bounded audit (per-model reads, blocked statistics, per-output writes) gives the straightforward results.

Straightforward here means what the previous implementation did: every model's logits stacked in
one float64 array, softmax statistics with scipy's logsumexp over all of it, shadow sums over all
models at once. Scores must agree to 1e-9 with identical NaN patterns.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from synthetic import synthetic_arrays, write_synthetic_experiment

from mia_lightning.attacks import AttackData, base, create_attack
from mia_lightning.attacks import module
from mia_lightning.attacks.module import score_targets
from mia_lightning.audit import run_audit
from mia_lightning.contract.experiment import ExperimentDir


def straightforward_statistics(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi and log p_y from one float64 copy of all logits (the unblocked formulas)."""
    z = logits.astype(np.float64)
    index = np.broadcast_to(labels[None, :, None, None], z.shape[:-1] + (1,))
    z_y = np.take_along_axis(z, index, axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, index, -np.inf, axis=-1)
    return z_y - logsumexp(others, axis=-1), z_y - logsumexp(z, axis=-1)


def test_blocked_statistics_equal_the_full_array_formulas(monkeypatch):
    keep, labels, logits, _ = synthetic_arrays(n_models=7, n_samples=40, n_queries=3, n_classes=5, seed=1)
    logits[2, 5, 0] = [80.0, -20.0, 0.0, 3.0, -5.0]  # a confident model: log(1 - p) would underflow
    monkeypatch.setattr(base, "STATS_BLOCK_ELEMENTS", 1)  # one model per block
    data = AttackData(keep=keep, labels=labels, logits=logits)
    phi, log_p_y = straightforward_statistics(logits, labels)
    np.testing.assert_allclose(data.phi, phi, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(data.log_true_class, log_p_y, rtol=1e-12, atol=1e-12)


@pytest.fixture
def experiment(tmp_path):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=9, n_samples=60, n_queries=2, n_population=6, seed=12)
    keep = np.load(root / "keep.npy")
    keep[:, 0] = [True] + [False] * 8  # sample 0: one IN model -> no IN shadow for target 0, NaN online score
    keep[:, 1] = [True, True] + [False] * 7  # sample 1: a single IN shadow -> pooled-std fallback
    np.save(root / "keep.npy", keep)
    return root


def test_file_backed_blocked_audit_equals_in_memory_unblocked_scores(experiment, monkeypatch):
    keep, labels = np.load(experiment / "keep.npy"), np.load(experiment / "labels.npy")
    logits = np.stack([np.load(experiment / "models" / f"{m:04d}" / "logits.npy") for m in range(9)])
    population = np.load(experiment / "population.npy")
    families = ["lira", "rmia", "thresholds", "reference"]
    unblocked = AttackData(keep=keep, labels=labels, logits=logits, population=population)
    expected = {}
    for family in families:
        expected |= score_targets(create_attack(family), unblocked, np.arange(9), batch_size=9)
    monkeypatch.setattr(base, "STATS_BLOCK_ELEMENTS", 1)
    run_audit(experiment, families, bootstrap=0)
    for name, want in expected.items():
        got = np.load(experiment / "attacks" / name / "scores.npy")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=name)
    assert np.isnan(np.load(experiment / "attacks/lira_online/scores.npy")[0, 0])


def test_scoring_batches_do_not_change_scores(experiment):
    data = AttackData.from_experiment(ExperimentDir(experiment))
    for family in ("lira", "rmia"):
        one = score_targets(create_attack(family), data, np.arange(9), batch_size=1)
        all_at_once = score_targets(create_attack(family), data, np.arange(9), batch_size=9)
        for name in one:
            np.testing.assert_array_equal(one[name], all_at_once[name], err_msg=name)


@pytest.mark.parametrize("family", ["lira", "rmia", "thresholds", "reference"])
def test_threaded_scoring_equals_one_thread(experiment, monkeypatch, family):
    """Attacks with ``threaded_scoring`` score a share of each target batch per thread: the same numbers and warnings as one thread."""
    data = AttackData.from_experiment(ExperimentDir(experiment))
    results = []
    for threads in (1, 4):
        monkeypatch.setattr(module, "numpy_threads", lambda threads=threads: threads)
        attack = create_attack(family)
        results.append((score_targets(attack, data, np.arange(9), batch_size=9), attack._flagged))
    (serial, serial_flags), (threaded, threaded_flags) = results
    assert create_attack(family).threaded_scoring and serial_flags == threaded_flags
    for name in serial:
        np.testing.assert_array_equal(serial[name], threaded[name], err_msg=name)
