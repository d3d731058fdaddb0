"""RMIA against a straightforward loop over the definitions of docs/attacks.md ("RMIA")."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from synthetic import synthetic_attack_data

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.errors import MiaError
from mia_lightning.metrics import membership_metrics


def true_class_probability_loop(data: AttackData) -> np.ndarray:
    M, n, Q, _ = data.logits.shape
    p = np.zeros((M, n))
    for m in range(M):
        for j in range(n):
            for a in range(Q):
                z = data.logits[m, j, a].astype(np.float64)
                e = np.exp(z - z.max())
                p[m, j] += e[data.labels[j]] / e.sum() / Q
    return p


def rmia_loop(data: AttackData, targets, a: float, gamma: float = 1.0, n_shadows=None) -> dict[str, np.ndarray]:
    """score(x) = fraction of z in Z (with a defined ratio; x itself when it is in Z), with ratio(x) / ratio(z) >= gamma."""
    M, n = data.keep.shape
    p = true_class_probability_loop(data)
    out = {name: np.full((len(targets), n), np.nan) for name in ("rmia_online", "rmia_offline")}
    for ti, t in enumerate(targets):
        refs = [m for m in range(M) if m != t]
        if n_shadows is not None:
            refs = refs[:n_shadows]
        population = list(data.population) if data.population is not None else [z for z in range(n) if not data.keep[t, z]]
        ratios = {"rmia_online": np.zeros(n), "rmia_offline": np.zeros(n)}
        for j in range(n):
            ratios["rmia_online"][j] = p[t, j] / np.mean([p[m, j] for m in refs])
            outs = [p[m, j] for m in refs if not data.keep[m, j]]
            ratios["rmia_offline"][j] = p[t, j] / (((1 + a) * np.mean(outs) + (1 - a)) / 2) if outs else math.nan
        for name, ratio in ratios.items():
            for x in range(n):
                if math.isnan(ratio[x]):
                    continue
                zs = [z for z in population if not math.isnan(ratio[z])]
                out[name][ti, x] = sum(ratio[x] / ratio[z] >= gamma for z in zs) / len(zs)
    return out


def assert_same(got: dict, want: dict) -> None:
    for name, expected in want.items():
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("n_population", "n_shadows", "gamma"),
    [(0, None, 1.0), (0, 3, 1.0), (10, None, 1.0), (10, 4, 2.0), (0, None, 0.5)],
)
def test_rmia_matches_loop(n_population, n_shadows, gamma):
    data = synthetic_attack_data(n_models=7, n_samples=40, n_queries=2, n_population=n_population, seed=1)
    targets = np.array([0, 3, 6])
    attack = create_attack("rmia", a=0.3, gamma=gamma, n_shadows=n_shadows)
    got = score_targets(attack, data, targets, batch_size=2)
    assert_same(got, rmia_loop(data, targets, a=0.3, gamma=gamma, n_shadows=n_shadows))
    assert attack.params() == {"gamma": gamma, "a": 0.3, "a_tuned": False, "n_shadows": n_shadows}


def test_no_out_reference_gives_nan_and_one_warning(caplog):
    data = synthetic_attack_data(n_models=4, n_samples=30, seed=2)
    data.keep[:, 0] = [False, True, True, True]  # target 0's references 1..3 all trained on sample 0
    targets = np.arange(4)
    with caplog.at_level(logging.WARNING, logger="mia_lightning"):
        got = score_targets(create_attack("rmia", a=0.5), data, targets)
    assert_same(got, rmia_loop(data, targets, a=0.5))
    assert np.isnan(got["rmia_offline"][0, 0]) and np.isfinite(got["rmia_online"][0, 0])
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        "RMIA: 1 samples have no OUT reference model for some target: no offline score there, left out of the metrics"
    ]


@pytest.mark.parametrize(("n_population", "n_shadows"), [(0, None), (8, 3)])
def test_a_tuning_picks_best_auc_on_reference_model_zero(n_population, n_shadows):
    data = synthetic_attack_data(n_models=6, n_samples=48, n_population=n_population, effect=0.8, seed=3)
    attack = create_attack("rmia", n_shadows=n_shadows)
    attack.fit(data)
    audited = data.audit_mask
    aucs = []
    for a in np.round(np.arange(11) / 10, 1):
        scores = rmia_loop(data, [0], a=a, n_shadows=n_shadows)["rmia_offline"][0]
        ok = audited & np.isfinite(scores)
        aucs.append(membership_metrics(scores[ok], data.keep[0, ok])["auc"])
    expected = round(float(np.flatnonzero(np.array(aucs) >= max(aucs) - 1e-12)[0]) / 10, 1)
    params = attack.params()
    assert params["a"] == expected and params["a_tuned"] is True
    np.testing.assert_allclose(list(params["a_tuning_auc"].values()), aucs, atol=1e-12)
    targets = np.array([1, 5])
    assert_same(attack.score(targets), rmia_loop(data, targets, a=expected, n_shadows=n_shadows))


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(MiaError, match="gamma"):
        create_attack("rmia", gamma=0)
    with pytest.raises(MiaError, match="a=1.5"):
        create_attack("rmia", a=1.5)
    with pytest.raises(MiaError, match="n_shadows=9"):
        create_attack("rmia", a=0.5, n_shadows=9).fit(synthetic_attack_data(n_models=4, n_samples=20))


def test_without_a_population_equal_ratios_get_equal_scores_whatever_the_membership():
    """Z is the target's non-members: a tie between a member and a non-member must not split by membership."""
    data = synthetic_attack_data(n_models=5, n_samples=12, seed=4)
    attack = create_attack("rmia", a=0.3)
    attack.fit(data)
    ratio = np.repeat([[1.0, 2.0, 3.0]], 4, axis=0).T.reshape(1, -1)  # three tie groups of four samples
    scores = attack.relative_scores(ratio, np.array([0]))[0]
    members = data.keep[0]
    for value in (1.0, 2.0, 3.0):
        group = ratio[0] == value
        assert members[group].any() and (~members[group]).any()  # both kinds in each tie group
        assert np.unique(scores[group]).size == 1, (value, scores[group], members[group])
