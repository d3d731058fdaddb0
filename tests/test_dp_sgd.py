"""DP-SGD callback: clipping per sample against a straightforward per-sample gradient loop, noise that destroys accuracy, accounting, bad settings."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mia_lightning.data.text import TextDataModule, encoded_pool, load_texts
from mia_lightning.errors import MiaError
from mia_lightning.farm.checkpoints import load_model_checkpoint, save_model_checkpoint
from mia_lightning.models.lstm import LSTMClassifier
from mia_lightning.defences.dp_sgd import DPSGD, PoissonBatchSampler
from test_text import write_reviews


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    load_texts.cache_clear()
    encoded_pool.cache_clear()
    return write_reviews(tmp_path_factory.mktemp("dp") / "reviews.csv", n=120)


def trainer(callback: DPSGD, **kwargs) -> L.Trainer:
    return L.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def accuracy(model: LSTMClassifier, dm: TextDataModule) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(dm.tokens)).argmax(-1).numpy()
    return float((predicted == dm.pool_labels()).mean())


def test_one_step_clips_each_sample_gradient_as_opacus_specifies(reviews):
    """SGD's first step is -lr * g: g must be sum_i g_i * min(1, C / ||g_i||) / expected batch, from a loop over the Poisson batch."""
    dm = TextDataModule(source=str(reviews), vocab_size=40, max_len=12, batch_size=20, train_indices=list(range(60)), seed=5)
    torch.manual_seed(0)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=4, hidden_size=4, lstm="opacus", optimizer="sgd", lr=1.0)
    start = copy.deepcopy(model)
    clip = 0.05
    trainer(DPSGD(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=clip), max_epochs=1, limit_train_batches=1).fit(model, datamodule=dm)
    dp_update = {name: (p0 - p1).detach() for (name, p0), p1 in zip(start.named_parameters(), model.parameters())}

    batch = next(iter(PoissonBatchSampler(np.arange(60), 20 / 60, seed=5)))
    per_sample, norms = [], []
    for i in batch:
        sample_model = copy.deepcopy(start)
        tokens, label = torch.from_numpy(dm.tokens[[i]]), torch.from_numpy(dm.pool_labels()[[i]])
        F.cross_entropy(sample_model(tokens), label).backward()
        grads = {name: p.grad.detach().clone() for name, p in sample_model.named_parameters()}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        per_sample.append({name: g * min(1.0, clip / (float(norm) + 1e-6)) for name, g in grads.items()})
        norms.append(float(norm))
    assert max(norms) > 2 * clip  # clipping was active
    expected = {name: sum(g[name] for g in per_sample) / 20 for name in dp_update}
    for name in dp_update:
        torch.testing.assert_close(dp_update[name], expected[name], atol=1e-6, rtol=1e-4)
    summed_norm = float(torch.sqrt(sum((u**2).sum() for u in dp_update.values())))
    assert summed_norm <= len(batch) * clip / 20 + 1e-6  # the update's norm is bounded by the clipping


def test_huge_noise_destroys_accuracy_and_no_noise_learns(reviews):
    results = {}
    for noise in (0.0, 1000.0):
        dm = TextDataModule(source=str(reviews), vocab_size=40, max_len=12, batch_size=16, seed=1)
        torch.manual_seed(0)
        model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=16, hidden_size=16, lstm="opacus", lr=0.02)
        trainer(DPSGD(target_epsilon=None, noise_multiplier=noise, max_grad_norm=1.0, seed=0), max_epochs=12).fit(model, datamodule=dm)
        results[noise] = accuracy(model, dm)
    assert results[0.0] > 0.9, results
    assert results[1000.0] < 0.7, results


def test_target_epsilon_sets_the_noise_and_the_state_reaches_the_checkpoint(reviews, tmp_path):
    dm = TextDataModule(source=str(reviews), vocab_size=40, max_len=12, batch_size=16, seed=1)
    torch.manual_seed(0)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=8, hidden_size=8, lstm="opacus")
    callback = DPSGD(target_epsilon=4.0, max_grad_norm=1.0, accountant="rdp")
    run = trainer(callback, max_epochs=2)
    run.fit(model, datamodule=dm)
    state = model.dp_state
    assert state["steps"] == state["planned_steps"] == 2 * 4  # 60 training texts, q = 16/60: ceil(1/q) = 4 steps per epoch
    assert 3.8 < state["epsilon"] <= 4.0 and state["delta"] == pytest.approx(1 / 600)
    assert float(run.callback_metrics["dp_epsilon"]) == pytest.approx(state["epsilon"])
    save_model_checkpoint(model, tmp_path / "model.ckpt", index=0, experiment="x")
    loaded = load_model_checkpoint(tmp_path / "model.ckpt", 0)
    assert loaded.dp_state["epsilon"] == pytest.approx(state["epsilon"]) and loaded.dp_state["accountant_state"]["mechanism"] == "rdp"


def test_budget_stop_with_a_given_noise(reviews):
    dm = TextDataModule(source=str(reviews), vocab_size=40, max_len=12, batch_size=16, seed=1)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=4, hidden_size=4, lstm="opacus")
    callback = DPSGD(target_epsilon=2.0, noise_multiplier=1.5, accountant="rdp")
    trainer(callback, max_epochs=50).fit(model, datamodule=dm)
    assert model.dp_state["steps"] < model.dp_state["planned_steps"]
    assert model.dp_state["epsilon"] <= 2.0 < callback.spent_epsilon(extra_steps=1)


@pytest.mark.parametrize(
    "kwargs, model_kwargs, fragment",
    [
        ({"target_epsilon": 1e-9}, {"lstm": "opacus"}, "cannot be reached"),
        ({"target_epsilon": 1.0, "noise_multiplier": 0.01}, {"lstm": "opacus"}, "a single step already spends"),
        ({"target_epsilon": 8.0}, {"lstm": "torch"}, "layers opacus cannot privatise"),
        ({"target_epsilon": 8.0}, {"lstm": "opacus", "adv_reg": 1.0}, "manual optimisation"),
    ],
)
def test_settings_that_cannot_work_fail_in_one_line(reviews, kwargs, model_kwargs, fragment):
    dm = TextDataModule(source=str(reviews), vocab_size=40, max_len=12, batch_size=16)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=4, hidden_size=4, **model_kwargs)
    with pytest.raises(MiaError, match=fragment) as err:
        DPSGD(**kwargs).check_recipe(dm, model, max_epochs=1)  # before anything runs
    assert "\n" not in str(err.value)
    with pytest.raises(MiaError, match=fragment):
        trainer(DPSGD(**kwargs), max_epochs=1).fit(model, datamodule=dm)


@pytest.mark.parametrize("kwargs", [{"target_epsilon": None}, {"target_epsilon": -1.0}, {"target_delta": 1.0}, {"max_grad_norm": 0.0}, {"accountant": "gdp2"},
                                    {"target_epsilon": float("inf")}, {"target_epsilon": None, "noise_multiplier": float("inf")},
                                    {"max_grad_norm": float("inf")}, {"batch_size": 0}, {"batch_size": -5}])
def test_bad_arguments_are_refused_at_construction(kwargs):
    with pytest.raises(MiaError):
        DPSGD(**kwargs)


def test_an_infinite_target_epsilon_is_refused_not_trained_with_the_noise_search_cap():
    """target_epsilon .inf trained with noise 10 (the search's cap, epsilon 0.08); no DP is spelled target_epsilon: null, noise_multiplier: 0."""
    with pytest.raises(MiaError, match=r"target_epsilon inf: must be positive and finite \(no DP: target_epsilon: null, noise_multiplier: 0\)"):
        DPSGD(target_epsilon=float("inf"))
    assert DPSGD(target_epsilon=None, noise_multiplier=0.0).noise_multiplier == 0.0


def test_poisson_sampler_includes_each_sample_with_the_rate():
    sampler = PoissonBatchSampler(np.arange(1000), 0.05, seed=0)
    assert len(sampler) == 20
    sizes = [len(b) for b in sampler]
    assert abs(np.mean(sizes) - 50) < 5 and len(set(sizes)) > 1  # Poisson: sizes vary around q n
    counts = np.bincount(np.concatenate([b for _ in range(10) for b in sampler]), minlength=1000)
    assert abs(counts.mean() - 10) < 0.5  # 200 steps at q = 0.05: each sample about 10 times


def test_a_batchnorm_model_is_told_what_trains_under_dp_not_the_lstm_fix():
    """The refusal named model.init_args.lstm for every model (an ImageClassifier has no such option) and cut opacus' reason mid-word."""
    class BatchNormed(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))

    with pytest.raises(MiaError) as err:
        DPSGD(target_epsilon=1.0)._check_module(BatchNormed())
    assert str(err.value) == ("DPSGD: BatchNormed has layers opacus cannot privatise (BatchNorm cannot support training with differential privacy); "
                              "train layers opacus supports, e.g. linear heads on frozen backbone features (configs/images/fmnist_dp_heads.yaml)")


def test_a_training_set_smaller_than_the_minimum_batch_is_named_not_the_batch_size():
    """Few-shot heads with 4 training samples and batch_size 64 were told to raise the batch size (expected batch = n_train there)."""
    with pytest.raises(MiaError, match=r"^DPSGD: expected batch 4 is below 8; each model trains on only 4 samples; give it at least 8 \(e.g. more shots or classes\)$"):
        DPSGD(target_epsilon=1.0)._plan_budget(4, 1.0, 1)
    with pytest.raises(MiaError, match=r"^DPSGD: expected batch 1 is below 8; raise the batch size$"):
        DPSGD(target_epsilon=1.0)._plan_budget(100, 0.01, 1)
