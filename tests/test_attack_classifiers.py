"""The one batched attack classifier: per (target, group) fits, target isolation by weights, one vocabulary."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from mia_lightning.attacks import create_attack
from mia_lightning.attacks.classifier_options import CLASSIFIERS, MLPSettings, check_classifier
from mia_lightning.attacks.classifiers import attack_scores, concurrent_attack_scores
from mia_lightning.errors import MiaError
from mia_lightning.metrics import rank_auc


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [n, 3], member [n] (member iff x0 > 0 in group 0, x1 > 0 in group 1), group [n]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    group = rng.integers(0, 2, n)
    member = np.where(group == 0, x[:, 0] > 0, x[:, 1] > 0)
    return x, member, group


def test_logistic_equals_one_scikit_learn_fit_per_target_and_group():
    x, member, group = _rows(400, 0)
    weight = np.ones((2, 400))
    weight[1, :100] = 0  # target 1 must not train on the first 100 rows
    test_x, _, test_group = _rows(50, 1)
    scores = attack_scores("logistic", x, member, np.stack([test_x, test_x]), weight=weight, group=group, target_group=test_group, n_groups=2)
    for t in range(2):
        for g in range(2):
            train = (weight[t] > 0) & (group == g)
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train], member[train].astype(np.float32))
            np.testing.assert_allclose(scores[t, test_group == g], model.predict_proba(test_x[test_group == g])[:, 1], rtol=1e-12)



def test_decision_tree_is_the_reference_codes_ten_leaf_tree_fitted_per_target_and_group():
    """Chen et al.'s default attack model: sklearn's DecisionTreeClassifier(max_leaf_nodes=10, random_state=0) on each (target, group)'s rows."""
    x, member, group = _rows(800, 5)
    member = member ^ (np.random.default_rng(6).random(800) < 0.2)  # label noise: a full tree would need far more than 10 leaves
    weight = np.ones((2, 800))
    weight[1, 400:] = 0
    test_x, _, test_group = _rows(300, 7)
    scores = attack_scores("decision_tree", x, member, np.stack([test_x, test_x]), weight=weight, group=group, target_group=test_group, n_groups=2)
    for t in range(2):
        for g in range(2):
            train = (weight[t] > 0) & (group == g)
            tree = DecisionTreeClassifier(max_leaf_nodes=10, random_state=0).fit(x[train], member[train])
            assert tree.get_n_leaves() == 10
            np.testing.assert_array_equal(scores[t, test_group == g], tree.predict_proba(test_x[test_group == g])[:, 1])
    assert len(np.unique(scores[0, test_group == 0])) <= 10  # a 10-leaf tree gives at most 10 distinct probabilities

@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_a_target_group_without_both_classes_gets_nan_and_the_others_probabilities(kind):
    x, member, group = _rows(600, 2)
    member = member & (group == 1) | (group == 0) & (x[:, 2] > 5)  # group 0: no member row at all
    test_x, _, test_group = _rows(40, 3)
    scores = attack_scores(kind, x, member, test_x[None], group=group, target_group=test_group, n_groups=2,
                           mlp=MLPSettings(hidden=8, steps=20, batch_size=64))
    assert np.isnan(scores[0, test_group == 0]).all()
    assert ((scores[0, test_group == 1] >= 0) & (scores[0, test_group == 1] <= 1)).all()


def test_the_batched_mlp_trains_each_target_only_on_its_weighted_rows():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 2)).astype(np.float32)
    half = np.arange(2000) < 1000
    member = np.where(half, x[:, 0] > 0, x[:, 1] > 0)  # first half: member iff x0 > 0; second half: iff x1 > 0
    weight = np.stack([half, ~half]).astype(np.float32)  # target 0 sees the first half, target 1 the second
    test = rng.normal(size=(500, 2)).astype(np.float32)
    scores = attack_scores("mlp", x, member, np.stack([test, test]), weight=weight, mlp=MLPSettings(hidden=16, steps=300, batch_size=128, lr=1e-2))
    by_x0, by_x1 = test[:, 0] > 0, test[:, 1] > 0
    assert rank_auc(scores[0], by_x0) > 0.95 and abs(rank_auc(scores[0], by_x1) - 0.5) < 0.1
    assert rank_auc(scores[1], by_x1) > 0.95 and abs(rank_auc(scores[1], by_x0) - 0.5) < 0.1


def test_old_option_names_are_refused_naming_the_new_one():
    assert check_classifier("random_forest", "x") == "random_forest"
    with pytest.raises(MiaError, match=r"--params unlearning.classifiers='lr': renamed; use 'logistic'"):
        create_attack("unlearning", classifiers=["lr"])
    with pytest.raises(MiaError, match=r"--params shokri.classifier='rf': renamed; use 'random_forest'"):
        create_attack("shokri", classifier="rf")


def test_the_mlp_fit_runs_on_one_torch_thread_and_restores_the_count(monkeypatch):
    """The batched attack MLP trains with one thread (faster for its small kernels); the caller's thread count is left as it was."""
    import torch

    from mia_lightning.attacks import classifiers

    seen = []
    fit = classifiers.BatchedAttackMLP.training_step
    monkeypatch.setattr(classifiers.BatchedAttackMLP, "training_step", lambda self, *args: seen.append(torch.get_num_threads()) or fit(self, *args))
    x, member, group = _rows(200, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        attack_scores("mlp", x, member, x[None], group=group, target_group=group, n_groups=2, mlp=MLPSettings(hidden=4, steps=3, batch_size=64))
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_concurrent_fits_give_the_scores_of_fits_run_one_at_a_time():
    """Each MLP fit draws from its own seeded streams: the global torch seed changes nothing, and two fits in
    threads (``concurrent_attack_scores``, as Shokri trains its two designs) equal the same fits in turn."""
    import torch

    x, member, group = _rows(600, 7)
    test_x, _, test_group = _rows(50, 8)
    settings = MLPSettings(hidden=8, steps=40, batch_size=64)
    requests = [dict(kind="mlp", features=x.astype(np.float32), member=member, target_features=test_x[None].astype(np.float32),
                     group=group, target_group=test_group, n_groups=2, seed=seed, mlp=settings) for seed in (3, 4)]
    torch.manual_seed(1)
    in_turn = [attack_scores(**request) for request in requests]
    torch.manual_seed(2)
    side_by_side = concurrent_attack_scores(requests)
    for alone, together in zip(in_turn, side_by_side):
        np.testing.assert_array_equal(alone, together)
    assert not np.array_equal(in_turn[0], in_turn[1])  # the seeds matter: different fits, not one fit twice


def test_a_set_stop_event_ends_the_mlp_fit_after_its_current_step():
    """A fit whose caller was interrupted stops after one step: its scores are those of a one-step fit, not of the full one."""
    import threading

    x, member, group = _rows(600, 7)
    test_x, _, test_group = _rows(50, 8)
    request = dict(kind="mlp", features=x.astype(np.float32), member=member, target_features=test_x[None].astype(np.float32),
                   group=group, target_group=test_group, n_groups=2, seed=3)
    stop = threading.Event()
    stop.set()
    stopped = attack_scores(**request, mlp=MLPSettings(hidden=8, steps=40, batch_size=64), stop=stop)
    np.testing.assert_array_equal(stopped, attack_scores(**request, mlp=MLPSettings(hidden=8, steps=1, batch_size=64)))
    assert not np.array_equal(stopped, attack_scores(**request, mlp=MLPSettings(hidden=8, steps=40, batch_size=64)))
