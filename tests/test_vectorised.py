"""The vectorised farm against the sequential Lightning farm: same seeds, same updates, same models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.errors import MiaError
from mia_lightning.farm.engine import ComponentSpec, FarmSetup, ModelJob, SequentialEngine, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine
from mia_lightning.models.ensemble import VectorisedMLP


def make_setup(epochs: int = 3, batch_size: int = 32, **model_args) -> FarmSetup:
    model = {"hidden": [16], "lr": 0.01, **model_args}
    return FarmSetup(
        data=ComponentSpec("mia_lightning.data.tabular.TabularDataModule", {"source": "breast_cancer", "batch_size": batch_size}),
        model=ComponentSpec("mia_lightning.models.tabular_mlp.TabularMLP", model),
        trainer={"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    )


def make_jobs(n_models: int = 4) -> list[ModelJob]:
    keep, _ = make_lira_plan(PlanSpec("breast_cancer", 569, n_models, seed=1))
    return [ModelJob(i, np.flatnonzero(keep[i]), model_seed(1, i)) for i in range(n_models)]


def train_both(setup: FarmSetup, jobs: list[ModelJob]):
    sequential = {r.index: r for r in SequentialEngine(setup).run(jobs)}
    vectorised = {r.index: r for r in VectorisedEngine(setup, group_size=3).run(jobs)}
    return sequential, vectorised


@pytest.mark.parametrize(
    "batch_size,model_args",
    [
        (1024, {"optimizer": "adam"}),  # full batch
        (32, {"optimizer": "adam", "weight_decay": 1e-3}),
        (32, {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3}),
        (32, {"optimizer": "adamw", "hidden": []}),  # linear heads
        (32, {"optimizer": "adam", "hidden": [16, 8]}),
    ],
)
def test_same_seeds_give_the_same_models(batch_size, model_args):
    sequential, vectorised = train_both(make_setup(batch_size=batch_size, **model_args), make_jobs())
    assert sorted(sequential) == sorted(vectorised) == [0, 1, 2, 3]
    for index in sequential:
        seq_state, vec_state = sequential[index].module.state_dict(), vectorised[index].module.state_dict()
        assert seq_state.keys() == vec_state.keys()
        for key in seq_state:
            torch.testing.assert_close(vec_state[key], seq_state[key], rtol=1e-5, atol=1e-5, msg=key)
        np.testing.assert_allclose(vectorised[index].logits, sequential[index].logits, rtol=1e-4, atol=1e-4)
        assert vectorised[index].logits.shape == (569, 1, 2)


def test_accuracy_distributions_match_with_dropout():
    """With dropout the random streams differ; the models must still be statistically alike."""
    setup = make_setup(epochs=15, batch_size=32, dropout=0.3)
    sequential, vectorised = train_both(setup, make_jobs(6))
    seq_acc = np.mean([r.metrics["val_acc"] for r in sequential.values()])
    vec_acc = np.mean([r.metrics["val_acc"] for r in vectorised.values()])
    assert seq_acc > 0.9 and abs(seq_acc - vec_acc) < 0.03, (seq_acc, vec_acc)


def test_bf16_mixed_precision_trains_close_to_fp32():
    setup = make_setup(batch_size=64)
    jobs = make_jobs(2)
    full = {r.index: r for r in VectorisedEngine(setup).run(jobs)}
    half_setup = FarmSetup(setup.data, setup.model, {**setup.trainer, "precision": "bf16-mixed"})
    half = {r.index: r for r in VectorisedEngine(half_setup).run(jobs)}
    for index in full:
        assert half[index].logits.dtype == np.float32
        assert abs(half[index].metrics["val_acc"] - full[index].metrics["val_acc"]) < 0.05


def test_unstack_round_trips_the_ensemble():
    setup = make_setup()
    jobs = make_jobs(3)
    datamodules = [setup.build_datamodule(job) for job in jobs]
    models = [setup.build_model(dm, job.seed) for dm, job in zip(datamodules, jobs)]
    for model, dm in zip(models, datamodules):
        model.fit_standardizer(*dm.train_feature_stats())
    pool = datamodules[0].pool
    ensemble = VectorisedMLP(models, torch.from_numpy(pool.features), torch.from_numpy(pool.labels)).eval()
    x = torch.from_numpy(pool.features[:10])
    stacked = ensemble(x.unsqueeze(0).expand(3, -1, -1))
    for k, single in enumerate(ensemble.unstack()):
        torch.testing.assert_close(single(x), stacked[k])
        torch.testing.assert_close(single(x), models[k].eval()(x))


def test_other_families_need_the_sequential_engine():
    setup = FarmSetup(ComponentSpec("mia_lightning.data.tabular.TabularDataModule"), ComponentSpec("lightning.pytorch.demos.boring_classes.BoringModel"), {})
    with pytest.raises(MiaError, match="farm.engine: sequential"):
        VectorisedEngine(setup)
