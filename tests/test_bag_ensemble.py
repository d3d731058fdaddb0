"""The bag-of-words ensemble (models/bag_ensemble.py): steps against the single models, the vectorised farm against the sequential one, DP-SGD's closed form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from mia_lightning.cli import train_main
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.defences.dp_ensemble import clipped_gradient_sums
from mia_lightning.errors import MiaError
from mia_lightning.farm.checkpoints import load_model_checkpoint
from mia_lightning.farm.engine import FarmSetup, ModelJob, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine, choose_engine
from mia_lightning.models.bag import BagOfWordsClassifier, bag_of_words
from mia_lightning.models import bag_ensemble
from mia_lightning.models.bag_ensemble import BagInputs, BagSum, VectorisedBag, bag_transpose, packed_bags
from mia_lightning.models.lstm import make_optimizer

from engine_equivalence import assert_engines_agree, assert_experiments_agree
from test_dp_heads import per_sample_gradients
from test_lstm_ensemble import farms_on_both_engines
from test_text import fresh_caches, write_recipe, write_reviews  # noqa: F401  (shared builders; the fixture clears the text caches)

N_REVIEWS = 60
DP_SGD = "mia_lightning.defences.dp_sgd.DPSGD"


def generated_tokens(n: int = 20, length: int = 9, vocab: int = 30) -> torch.Tensor:
    """Token ids with repeated words, front padding, a row of padding only and a row of one repeated word."""
    tokens = torch.randint(0, vocab, (n, length))
    tokens[0] = 0
    tokens[1, :5] = 0
    tokens[2] = 7
    return tokens


def test_packed_bags_scatter_back_to_the_dense_bag_of_words():
    torch.manual_seed(0)
    tokens = generated_tokens()
    ids, weights = packed_bags(tokens)
    assert ids.shape[1] == max(len(set(row) - {0}) for row in tokens.tolist())  # cut to the most distinct words of a row
    dense = torch.zeros(len(tokens), 30).scatter_add_(1, ids, weights)
    torch.testing.assert_close(dense, bag_of_words(tokens, 30), rtol=0, atol=0)


def test_bag_sum_backward_against_finite_differences_and_in_chunks(monkeypatch):
    """The hand-written backward (``bag_transpose``) by gradcheck, and the same product whether ``index_add_`` runs in one chunk or many."""
    torch.manual_seed(2)
    ids, weights = packed_bags(generated_tokens(n=12))
    table = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: BagSum.apply(t, ids, weights.double()), (table,))
    values = torch.randn(12, 4, dtype=torch.float64)
    whole = bag_transpose(ids, weights, values, 30)
    monkeypatch.setattr(bag_ensemble, "SCATTER_ELEMENTS", 3 * ids.shape[1] * 4)  # 3 bags per chunk
    torch.testing.assert_close(bag_transpose(ids, weights, values, 30), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("embedding_dim,optimizer", [(0, "adam"), (4, "adamw"), (4, "sgd")])
def test_two_steps_in_float64_equal_the_single_models_steps(embedding_dim, optimizer):
    """Three models, each on its own minibatches: after two optimiser steps every parameter equals its single model's to 1e-10."""
    torch.manual_seed(0)
    models = [BagOfWordsClassifier(vocab_size=30, n_classes=3, embedding_dim=embedding_dim, optimizer=optimizer, lr=0.1, weight_decay=0.01).double()
              for _ in range(3)]
    tokens, labels = generated_tokens(), torch.randint(0, 3, (20,))
    ensemble = VectorisedBag(models, tokens, labels).double()
    ensemble_optimizer = ensemble.configure_optimizers()
    single_optimizers = [make_optimizer(m.parameters(), m.hparams) for m in models]
    for step in range(2):
        batch = torch.stack([torch.randperm(20)[:6] for _ in range(3)])
        ensemble_optimizer.zero_grad()
        ensemble.training_step(batch, step).backward()
        ensemble_optimizer.step()
        for k, (model, single) in enumerate(zip(models, single_optimizers)):
            single.zero_grad()
            F.cross_entropy(model(tokens[batch[k]]), labels[batch[k]]).backward()
            single.step()
    predicted = ensemble.predict_step(torch.arange(20), 0)
    assert predicted.shape == (3, 20, 1, 3) and predicted.dtype == torch.float32
    for k, (model, unstacked) in enumerate(zip(models, ensemble.unstack())):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(unstacked.state_dict()[key], value, rtol=1e-10, atol=1e-10, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(predicted[k, :, 0], model(tokens).float())


def bag_setup(source, callbacks: tuple = (), epochs: int = 3, **model_args) -> FarmSetup:
    return FarmSetup(
        data=ComponentSpec("mia_lightning.data.text.TextDataModule", {"source": str(source), "vocab_size": 40, "max_len": 12, "batch_size": 8}),
        model=ComponentSpec("mia_lightning.models.bag.BagOfWordsClassifier", {"lr": 0.05, **model_args}),
        trainer={"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        callbacks=callbacks,
    )


def bag_jobs(n_models: int = 3) -> list[ModelJob]:
    keep = make_lira_plan(PlanSpec("reviews", N_REVIEWS, n_models, seed=2)).keep
    return [ModelJob(i, np.flatnonzero(keep[i]), model_seed(2, i)) for i in range(n_models)]


@pytest.mark.parametrize("model_args", [{"embedding_dim": 0}, {"embedding_dim": 8, "optimizer": "sgd", "lr": 0.5, "weight_decay": 1e-3}])
def test_same_seeds_give_the_same_bags(tmp_path, model_args):
    """Weights and pool logits of every model match the sequential Lightning farm to float32 tolerance (groups of 2 split 3 jobs)."""
    setup = bag_setup(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), **model_args)
    vectorised = assert_engines_agree(setup, bag_jobs(), BagOfWordsClassifier, (N_REVIEWS, 1, 2), (1e-4, 1e-6), (1e-4, 1e-5))
    assert not np.allclose(vectorised[0].logits, vectorised[1].logits, atol=1e-2)  # models differ: own seeds and subsets


def test_cli_farm_vectorised_writes_what_the_sequential_farm_writes(tmp_path):
    """``train.py farm`` with both engines on a bag recipe: same keep masks, labels and files per model, logits to 1e-4, done.json names the
    engine; the unstacked checkpoints reload and re-export the same logits."""
    experiments = farms_on_both_engines(tmp_path, {"class_path": "mia_lightning.models.bag.BagOfWordsClassifier", "init_args": {"embedding_dim": 4, "lr": 0.05}})
    seq, vec = experiments["sequential"], experiments["vectorised"]
    assert_experiments_agree(seq, vec, 4)
    assert train_main(["export", "--experiment", str(vec.root)]) == 0
    for index in range(4):
        np.testing.assert_allclose(np.load(vec.model_dir(index) / "logits.npy"), np.load(seq.model_dir(index) / "logits.npy"), rtol=1e-4, atol=1e-4)


def test_clipped_sums_on_sparse_bags_equal_per_sample_gradients_of_the_dense_model():
    """The closed form on packed bags: norms and clipped sums equal torch.func's per-sample gradients of the single model's dense head, clipped one by one."""
    torch.manual_seed(3)
    K, B, C, V = 3, 8, 3, 30
    models = [BagOfWordsClassifier(vocab_size=V, n_classes=C).double() for _ in range(K)]
    tokens, labels = generated_tokens(n=B * K), torch.randint(0, C, (B * K,))
    ensemble = VectorisedBag(models, tokens, labels).double()
    batch = torch.randperm(B * K).view(K, B)
    valid = torch.rand(K, B) < 0.8
    clip = torch.tensor([0.3, 1.0, 100.0], dtype=torch.float64)
    ids, weights = ensemble.pool_ids[batch], ensemble.pool_weights[batch]
    logits = ensemble(ids, weights)
    residual = torch.softmax(logits, -1) - F.one_hot(labels[batch], C).double()
    grad_w, grad_b, norms = clipped_gradient_sums(BagInputs(ids, weights, V), residual, valid, clip)
    for k, model in enumerate(models):
        x = bag_of_words(tokens[batch[k]], V).double()
        reference = per_sample_gradients(model.head.weight.detach().t(), model.head.bias.detach(), x, labels[batch[k]])
        torch.testing.assert_close(norms[k], reference.norm(dim=1), rtol=1e-10, atol=1e-12)
        clipped = reference * (clip[k] / (reference.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
        torch.testing.assert_close(torch.cat([grad_w[k].flatten(), grad_b[k, 0]]), clipped[valid[k]].sum(0), rtol=1e-10, atol=1e-12)
    assert (norms[0] > 0.3).any() and (norms[2] < 100).all()  # model 0 clips, model 2 does not


def test_dp_sgd_without_noise_equals_the_opacus_farm(tmp_path):
    """noise_multiplier 0: the same Poisson batches and the same clipping, so the vectorised heads equal the sequential farm's opacus run (SGD: no
    normalised update that would magnify float rounding of a near-zero gradient, as Adam's first steps do)."""
    callback = ComponentSpec(DP_SGD, {"target_epsilon": None, "noise_multiplier": 0.0, "max_grad_norm": 0.5})
    setup = bag_setup(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), (callback,), optimizer="sgd", lr=0.5)
    vectorised = assert_engines_agree(setup, bag_jobs(), BagOfWordsClassifier, (N_REVIEWS, 1, 2), (1e-5, 1e-6), (1e-5, 1e-5))
    assert all(result.metrics["dp_steps"] == 3 * 4 for result in vectorised.values())  # q = 8 / 30: 4 steps per epoch


def test_cli_dp_farm_spends_what_opacus_accounts_per_model_and_checkpoints_it(tmp_path):
    """A vectorised DP-SGD farm through ``train.py farm``: each model's epsilon equals a fresh opacus accountant's on its (noise, rate, steps),
    its checkpoint carries the DP state, and models differ (own batches and noise)."""
    from opacus.accountants import create_accountant

    path = write_recipe(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), tmp_path)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"] = {"class_path": "mia_lightning.models.bag.BagOfWordsClassifier", "init_args": {"lr": 0.05}}
    recipe["data"]["init_args"]["batch_size"] = 10
    recipe["trainer"]["callbacks"] = [{"class_path": DP_SGD, "init_args": {"target_epsilon": 4.0, "max_grad_norm": 1.0, "accountant": "rdp"}}]
    recipe["farm"] = {"engine": "vectorised", "group_size": 4}
    path.write_text(yaml.safe_dump(recipe))
    assert train_main(["farm", "--config", str(path)]) == 0
    experiment = ExperimentDir(tmp_path / "tiny_text")
    weights = []
    for index in range(4):
        done = json.loads((experiment.model_dir(index) / "done.json").read_text())
        metrics, n_train = done["metrics"], int(experiment.keep[index].sum())
        q = 10 / n_train
        accountant = create_accountant("rdp")
        for _ in range(int(metrics["dp_steps"])):
            accountant.step(noise_multiplier=metrics["dp_noise_multiplier"], sample_rate=q)
        assert done["engine"] == "vectorised" and metrics["dp_steps"] == 3 * int(np.ceil(1 / q))
        assert metrics["dp_epsilon"] == pytest.approx(accountant.get_epsilon(delta=metrics["dp_delta"])) and 3.5 < metrics["dp_epsilon"] <= 4.0
        model = load_model_checkpoint(experiment.model_dir(index) / "model.ckpt", index)
        assert model.dp_state["epsilon"] == metrics["dp_epsilon"] and model.dp_state["sample_rate"] == pytest.approx(q)
        weights.append(model.head.weight.detach())
    assert not torch.allclose(weights[0], weights[1])


def test_engine_choice_and_the_bag_of_embeddings_under_dp_sgd(tmp_path):
    """auto: the bag ensemble on the CPU (measured faster), DP-SGD included for the linear classifier; the bag of embeddings under DP-SGD is refused in one line."""
    source = write_reviews(tmp_path / "r.csv", n=N_REVIEWS)
    dp = (ComponentSpec(DP_SGD, {"target_epsilon": 4.0}),)
    assert choose_engine(bag_setup(source))[0] == "vectorised"
    assert choose_engine(bag_setup(source, dp))[0] == "vectorised"
    engine, reason = choose_engine(bag_setup(source, dp, embedding_dim=8))
    assert engine == "sequential" and "embedding_dim: 0" in reason
    with pytest.raises(MiaError, match="embedding_dim: 0") as err:
        VectorisedEngine(bag_setup(source, dp, embedding_dim=8))
    assert "farm.engine: sequential" in str(err.value) and "\n" not in str(err.value)
