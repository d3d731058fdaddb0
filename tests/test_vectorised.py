"""The vectorised farm against the sequential Lightning farm: same seeds, same updates, same models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.errors import MiaError
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine, TrainedModel, model_seed, resolve_engine
from mia_lightning.farm.vectorised import VectorisedEngine
from mia_lightning.models.ensemble import VectorisedMLP

N_DIGITS = 1797


def make_setup(epochs: int = 3, batch_size: int = 32, trainer: dict | None = None, **model_args) -> FarmSetup:
    """A tiny recipe on digits: hidden [16], no dropout unless asked."""
    model = {"hidden": [16], "lr": 0.01, **model_args}
    return FarmSetup(
        data=ComponentSpec("mia_lightning.data.tabular.TabularDataModule", {"source": "digits", "batch_size": batch_size}),
        model=ComponentSpec("mia_lightning.models.tabular_mlp.TabularMLP", model),
        trainer={"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, **(trainer or {})},
    )


def make_jobs(n_models: int = 4) -> list[ModelJob]:
    keep = make_lira_plan(PlanSpec("digits", N_DIGITS, n_models, seed=1)).keep
    return [ModelJob(i, np.flatnonzero(keep[i]), model_seed(1, i)) for i in range(n_models)]


def run(engine, jobs: list[ModelJob]) -> dict[int, TrainedModel]:
    return {r.index: r for r in engine.run(jobs)}


def train_both(setup: FarmSetup, jobs: list[ModelJob]) -> tuple[dict[int, TrainedModel], dict[int, TrainedModel]]:
    return run(SequentialEngine(setup), jobs), run(VectorisedEngine(setup, group_size=3), jobs)


def assert_same_models(sequential: dict[int, TrainedModel], vectorised: dict[int, TrainedModel]) -> None:
    assert sorted(sequential) == sorted(vectorised)
    for index in sequential:
        seq_state, vec_state = sequential[index].module.state_dict(), vectorised[index].module.state_dict()
        assert seq_state.keys() == vec_state.keys()
        for key in seq_state:
            torch.testing.assert_close(vec_state[key], seq_state[key], rtol=1e-5, atol=1e-5, msg=key)
        assert vectorised[index].logits.shape == (N_DIGITS, 1, 10) and vectorised[index].logits.dtype == np.float32
        np.testing.assert_allclose(vectorised[index].logits, sequential[index].logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "epochs,batch_size,model_args",
    [
        (10, 4096, {"optimizer": "adam"}),  # full batch
        (10, 4096, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-3}),  # full batch
        (2, 32, {"optimizer": "adam", "weight_decay": 1e-3}),  # two epochs: the second reshuffles each model's stream
        (2, 32, {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3}),
        (2, 32, {"optimizer": "adamw", "hidden": []}),  # linear heads
        (2, 32, {"optimizer": "adam", "hidden": [16, 8]}),
        (2, 32, {"optimizer": "adam", "temperature": 4.0}),  # trained and released at temperature 4
    ],
)
def test_same_seeds_give_the_same_models(epochs, batch_size, model_args):
    """Weights and pool logits of every model match the sequential Lightning farm (groups of 3 split 4 jobs)."""
    assert_same_models(*train_both(make_setup(epochs, batch_size, **model_args), make_jobs()))


def test_gradient_clipping_by_norm_is_per_model():
    setup = make_setup(trainer={"gradient_clip_val": 0.05})
    sequential, vectorised = train_both(setup, make_jobs(2))
    assert_same_models(sequential, vectorised)
    unclipped = run(VectorisedEngine(make_setup()), make_jobs(2))
    assert not np.allclose(unclipped[0].logits, vectorised[0].logits, atol=1e-2)


def test_max_steps_stops_both_farms_at_the_same_step():
    assert_same_models(*train_both(make_setup(epochs=3, trainer={"max_steps": 40}), make_jobs(2)))


def test_accuracy_distributions_match_with_dropout():
    """With dropout the two farms draw different masks; their models must still be statistically alike."""
    setup = make_setup(epochs=4, batch_size=128, hidden=[64], dropout=0.3)
    sequential, vectorised = train_both(setup, make_jobs(8))
    seq_acc = np.array([r.metrics["val_acc"] for r in sequential.values()])
    vec_acc = np.array([r.metrics["val_acc"] for r in vectorised.values()])
    assert seq_acc.mean() > 0.9 and abs(seq_acc.mean() - vec_acc.mean()) < 0.02, (seq_acc, vec_acc)


def test_bf16_mixed_precision_trains_close_to_fp32():
    setup, jobs = make_setup(batch_size=64), make_jobs(2)
    full = run(VectorisedEngine(setup), jobs)
    half = run(VectorisedEngine(FarmSetup(setup.data, setup.model, {**setup.trainer, "precision": "bf16-mixed"})), jobs)
    for index in full:
        assert half[index].logits.dtype == np.float32 and np.isfinite(half[index].logits).all()
        assert abs(half[index].metrics["val_acc"] - full[index].metrics["val_acc"]) < 0.05


def test_unstack_round_trips_the_ensemble():
    setup, jobs = make_setup(), make_jobs(3)
    datamodules = [setup.build_datamodule(job) for job in jobs]
    models = [setup.build_model(dm, job.seed) for dm, job in zip(datamodules, jobs)]
    for model, dm in zip(models, datamodules):
        model.fit_standardizer(*dm.train_feature_stats())
    pool = datamodules[0].pool
    ensemble = VectorisedMLP(models, torch.from_numpy(pool.features), torch.from_numpy(pool.labels)).eval()
    x = torch.from_numpy(pool.features[:10])
    stacked = ensemble(x.unsqueeze(0).expand(3, -1, -1))
    predicted = ensemble.predict_step(torch.arange(10), 0)
    assert predicted.shape == (3, 10, 1, 10)
    for k, single in enumerate(ensemble.unstack()):
        torch.testing.assert_close(single(x), stacked[k])
        torch.testing.assert_close(single(x), models[k].eval()(x))
        torch.testing.assert_close(predicted[k, :, 0], stacked[k])


def test_other_families_need_the_sequential_engine():
    setup = FarmSetup(ComponentSpec("mia_lightning.data.tabular.TabularDataModule"), ComponentSpec("lightning.pytorch.demos.boring_classes.BoringModel"), {})
    with pytest.raises(MiaError, match="farm.engine: sequential"):
        VectorisedEngine(setup)


TEXT = ("mia_lightning.data.text.TextDataModule", "mia_lightning.models.lstm.LSTMClassifier")
IMAGES = ("mia_lightning.data.images.ImageDataModule", "mia_lightning.models.image.ImageClassifier")
BAG = ("mia_lightning.data.text.TextDataModule", "mia_lightning.models.bag.BagOfWordsClassifier")
DP_SGD = (ComponentSpec("mia_lightning.defences.dp_sgd.DPSGD", {"target_epsilon": 8.0}),)


@pytest.mark.parametrize(
    "data,model,model_args,trainer,callbacks,derived,expected",
    [
        ("mia_lightning.data.tabular.TabularDataModule", "mia_lightning.models.tabular_mlp.TabularMLP", {}, {"accelerator": "cpu"}, (), False, "vectorised"),
        ("mia_lightning.data.tabular.TabularDataModule", "mia_lightning.models.tabular_mlp.TabularMLP", {}, {"accelerator": "gpu"}, (), False, "vectorised"),
        (*TEXT, {}, {"accelerator": "cpu"}, (), False, "sequential"),  # nn.LSTM's CPU kernel beats the stacked recurrence
        (*TEXT, {}, {"accelerator": "gpu"}, (), False, "vectorised"),
        (*TEXT, {"lstm": "opacus"}, {"accelerator": "gpu"}, (), False, "sequential"),  # DP-SGD
        (*TEXT, {"adv_reg": 1.0}, {"accelerator": "gpu"}, (), False, "sequential"),
        (*TEXT, {}, {"accelerator": "gpu"}, (ComponentSpec("lightning.pytorch.callbacks.EarlyStopping", {"monitor": "val_loss"}),), False, "sequential"),
        ("mia_lightning.data.tabular.TabularDataModule", "mia_lightning.models.tabular_mlp.TabularMLP", {}, {"accelerator": "cpu"}, (), True, "sequential"),
        (*BAG, {}, {"accelerator": "cpu"}, (), False, "vectorised"),  # found before the LSTM family on the same DataModule
        (*BAG, {"embedding_dim": 16}, {"accelerator": "cpu"}, (), False, "vectorised"),
        (*BAG, {}, {"accelerator": "cpu"}, DP_SGD, False, "vectorised"),  # closed-form DP-SGD of the linear classifier
        (*BAG, {"embedding_dim": 16}, {"accelerator": "cpu"}, DP_SGD, False, "sequential"),
        (*IMAGES, {"finetune": "film"}, {"accelerator": "cpu"}, (), False, "sequential"),  # 0.98x (FiLM) / 0.72x (full) on the CPU (docs/images.md)
        (*IMAGES, {"finetune": "full"}, {"accelerator": "gpu"}, (), False, "vectorised"),
    ],
)
def test_auto_engine_picks_the_faster_engine_that_can_train_the_recipe(data, model, model_args, trainer, callbacks, derived, expected):
    """``farm.engine: auto`` per family, device, model arguments, callbacks and derived models; every choice comes with its reason."""
    setup = FarmSetup(ComponentSpec(data), ComponentSpec(model, model_args), trainer, callbacks)
    engine, why = resolve_engine("auto", setup, derived_models=derived)
    assert engine == expected and why and "\n" not in why
    assert resolve_engine("sequential", setup) == ("sequential", None)


def test_auto_engine_follows_the_device_lightning_would_pick(monkeypatch):
    """``accelerator: auto`` (or none) trains on CUDA when there is one, so the LSTM ensemble is chosen only then."""
    setup = FarmSetup(ComponentSpec(TEXT[0]), ComponentSpec(TEXT[1]), {})
    for available, expected in ((False, "sequential"), (True, "vectorised")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert resolve_engine("auto", setup)[0] == expected


@pytest.mark.parametrize(
    "family,trainer,threads,expected",
    [
        (TEXT, {"accelerator": "cpu"}, None, 1),  # nn.LSTM's small kernels: one thread trains faster (benchmarks/farm_threads.py)
        (TEXT, {"accelerator": "gpu"}, None, None),
        (TEXT, {"accelerator": "cpu"}, 2, 2),  # farm.threads wins
        (BAG, {"accelerator": "cpu"}, None, None),
        (("mia_lightning.data.tabular.TabularDataModule", "lightning.pytorch.demos.boring_classes.BoringModel"), {"accelerator": "cpu"}, None, None),
    ],
)
def test_farm_threads_per_family_and_device(family, trainer, threads, expected):
    """Torch threads of a farm process: ``farm.threads``, else the family's CPU count, else torch's default (None); always with a reason."""
    from mia_lightning.farm.vectorised import farm_threads

    chosen, why = farm_threads(FarmSetup(ComponentSpec(family[0]), ComponentSpec(family[1]), trainer), threads)
    assert chosen == expected and (why is None) == (expected is None)


def test_torch_threads_are_restored_after_a_farm_even_when_it_fails():
    """A study farms in-process: a setting's thread count must not leak into the next setting or the audit."""
    from mia_lightning.runtime import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("training failed")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
