"""Shokri et al.'s shadow-model attack: a planted memoriser is separated from a non-memoriser, leave-one-out rows, the disjoint plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.attacks.shokri import attack_features
from mia_lightning.data.plan import PlanSpec, make_plan
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.metrics import rank_auc


def planted_logits(keep: np.ndarray, labels: np.ndarray, memorisers: np.ndarray, n_classes: int = 3, seed: int = 0) -> np.ndarray:
    """float32 [M, n, 1, C]: a memoriser's true-class margin is 4 on its members and ~N(0.5, 1) elsewhere; a non-memoriser's is ~N(0.5, 1) on every sample."""
    rng = np.random.default_rng(seed)
    M, n = keep.shape
    logits = rng.normal(0.0, 0.3, (M, n, 1, n_classes))
    margin = rng.normal(0.5, 1.0, (M, n))
    margin = np.where(keep & memorisers[:, None], 4.0 + rng.normal(0.0, 0.2, (M, n)), margin)
    logits[:, np.arange(n), 0, labels] += margin
    return logits.astype(np.float32)


def memoriser_data(M: int = 8, n: int = 300) -> AttackData:
    keep = make_plan(PlanSpec("planted", n, M, seed=1)).keep
    labels = np.random.default_rng(2).integers(0, 3, n)
    memorisers = np.ones(M, dtype=bool)
    memorisers[0] = False  # model 0 learnt nothing sample-specific
    return AttackData(keep=keep, labels=labels, logits=planted_logits(keep, labels, memorisers))


@pytest.mark.parametrize("classifier", ["mlp", "logistic"])
def test_shokri_separates_a_planted_memoriser_from_a_non_memoriser(classifier):
    data = memoriser_data()
    attack = create_attack("shokri", classifier=classifier, with_label=True)
    scores = score_targets(attack, data, np.array([0, 1, 2]))
    for name in ("shokri_per_class", "shokri_shared"):
        aucs = [rank_auc(scores[name][i], data.keep[t]) for i, t in enumerate([0, 1, 2])]
        assert aucs[1] > 0.95 and aucs[2] > 0.95, (name, aucs)  # memorisers
        assert abs(aucs[0] - 0.5) < 0.1, (name, aucs)  # the non-memoriser: chance


def test_features_are_sorted_posteriors_and_the_one_hot_label():
    posteriors = np.array([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    features = attack_features(posteriors, np.array([2, 0]), top_k=2, with_label=True)
    np.testing.assert_allclose(features, [[0.7, 0.2, 0, 0, 1], [0.5, 0.4, 1, 0, 0]])
    np.testing.assert_allclose(attack_features(posteriors, np.array([2, 0]), top_k=2, with_label=False, sort=False), posteriors)


def test_per_class_models_see_which_entry_is_the_true_class():
    """Members are confidently right, non-members confidently wrong: the sorted vector cannot tell them apart, the class-ordered one can."""
    rng = np.random.default_rng(0)
    keep = make_plan(PlanSpec("x", 400, 6, seed=0)).keep
    labels = rng.integers(0, 2, 400)
    confident = np.where(keep, 1, -1) * np.where(labels == 1, 1, -1) * 4.0 + rng.normal(0, 0.3, keep.shape)  # logit of class 1 minus class 0
    logits = np.stack([np.zeros_like(confident), confident], axis=-1)[:, :, None, :].astype(np.float32)
    data = AttackData(keep=keep, labels=labels, logits=logits)
    scores = score_targets(create_attack("shokri"), data, np.array([0]))
    assert rank_auc(scores["shokri_per_class"][0], keep[0]) > 0.95
    assert abs(rank_auc(scores["shokri_shared"][0], keep[0]) - 0.5) < 0.1


def test_leave_one_out_drops_only_the_targets_rows():
    data = memoriser_data(M=4, n=40)
    attack = create_attack("shokri")
    attack.fit(data)
    assert set(np.unique(attack.rows["shadow"])) == {0, 1, 2, 3}
    assert attack._excluded(np.array([2, 0])).tolist() == [2, 0]
    n_shadow = create_attack("shokri", n_shadows=2)
    n_shadow.fit(data)
    assert set(np.unique(n_shadow.rows["shadow"])) == {0, 1, 2}  # the pool 0..k; target 3 leaves out model 2
    assert n_shadow._excluded(np.array([1, 3])).tolist() == [1, 2]


def test_disjoint_shadows_plan_and_attack_use_only_the_shadow_half(tmp_path):
    spec = PlanSpec("x", 200, 9, seed=0, kind="disjoint_shadows", options={"n_targets": 1})
    plan = make_plan(spec)
    target_half, shadow_half = plan.audit[0], plan.audit[1]
    assert not (target_half & shadow_half).any() and (target_half | shadow_half).all()
    assert not (plan.keep[0] & shadow_half).any() and plan.keep[0].sum() == 50
    assert not (plan.keep[1:] & target_half).any() and (plan.audit[1:] == shadow_half).all()
    assert (plan.keep[1:, shadow_half].sum(axis=0) == 4).all()  # LiRA halves among the 8 shadows
    assert plan.info["target_models"] == [0] and plan.info["shadow_models"] == list(range(1, 9))
    labels = np.random.default_rng(0).integers(0, 3, 200)
    root = tmp_path / "exp"
    (root / "models").mkdir(parents=True)
    np.save(root / "keep.npy", plan.keep)
    np.save(root / "labels.npy", labels)
    np.save(root / "audit.npy", plan.audit)
    logits = planted_logits(plan.keep, labels, np.ones(9, dtype=bool))
    for m in range(9):
        (root / "models" / f"{m:04d}").mkdir()
        np.save(root / "models" / f"{m:04d}" / "logits.npy", logits[m])
    (root / "plan.json").write_text(json.dumps({**spec.to_json(), "info": plan.info}))
    data = AttackData.from_experiment(ExperimentDir(root))
    attack = create_attack("shokri")
    attack.fit(data)
    assert set(np.unique(attack.rows["shadow"])) == set(range(1, 9))
    assert attack.rows["posteriors"].shape[0] == 8 * 100  # each shadow contributes only its half
    scores = score_targets(attack, data, np.array([0]))["shokri_per_class"][0]
    assert rank_auc(scores[target_half], plan.keep[0, target_half]) > 0.95


@pytest.mark.parametrize("params, fragment", [({"classifier": "svm"}, "classifier"), ({"steps": 0}, "steps"), ({"top_k": 0}, "top_k")])
def test_bad_parameters_are_refused_in_one_line(params, fragment):
    with pytest.raises(MiaError, match=fragment):
        create_attack("shokri", **params)


def test_disjoint_plan_refuses_too_many_targets():
    with pytest.raises(MiaError, match="n_targets"):
        make_plan(PlanSpec("x", 50, 3, kind="disjoint_shadows", options={"n_targets": 3}))


def test_n_shadows_restricts_the_plans_listed_shadows_so_evaluation_trials_stay_independent(tmp_path):
    """On a disjoint-shadows plan, ``n_shadows = k`` means the k lowest listed shadows other than the target (as without a list):
    the independent-runs epsilon scores evaluation models with k shadows and relies on none training on another evaluation model."""
    spec = PlanSpec("x", 200, 9, seed=0, kind="disjoint_shadows", options={"n_targets": 1})
    plan = make_plan(spec)
    labels = np.random.default_rng(0).integers(0, 3, 200)
    logits = planted_logits(plan.keep, labels, np.ones(9, dtype=bool))
    np.save(tmp_path / "keep.npy", plan.keep)  # plan.json is read against it
    (tmp_path / "plan.json").write_text(json.dumps({**spec.to_json(), "info": plan.info}))
    experiment = ExperimentDir(tmp_path)

    def scores_of(logits: np.ndarray, target: int) -> np.ndarray:
        data = AttackData(keep=plan.keep, labels=labels, logits=logits, audit=plan.audit, experiment=experiment)
        attack = create_attack("shokri", classifier="logistic", n_shadows=4)
        attack.fit(data)
        assert attack._excluded(np.array([0, 3, 6])).tolist() == [5, 3, 5]  # pool: listed 1..5; outside it, the last is left out
        return score_targets(attack, data, np.array([target]))["shokri_per_class"][0]

    changed = logits.copy()
    changed[7] = planted_logits(plan.keep, labels, np.zeros(9, dtype=bool), seed=5)[7]  # another evaluation model
    np.testing.assert_array_equal(scores_of(logits, 6), scores_of(changed, 6))
