"""The image-classifier ensemble: one vmapped step against K single models, and the vectorised farm against the sequential one (FiLM, full, head)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from mia_lightning.cli import train_main
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.data.images import ImagePreprocess, make_few_shot_plan, query_views
from mia_lightning.data.plan import PlanSpec
from mia_lightning.farm.engine import FarmSetup, ModelJob, model_seed
from mia_lightning.models.image import ImageClassifier
from mia_lightning.models.image_ensemble import VectorisedImageClassifier

from engine_equivalence import assert_engines_agree, assert_experiments_agree
from test_images import TRAINER, clear_caches, image_recipe, write_image_folder

N_IMAGES = 18  # 3 classes x 2 x 3 shots


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    clear_caches()
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def weights_file(tmp_path: Path) -> str:
    """A resnet10t weights file: models built from it share every frozen tensor (as pretrained backbones do)."""
    torch.manual_seed(123)
    path = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    return str(path)


def single_models(finetune: str, weights: str, k: int = 3) -> list[ImageClassifier]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(ImageClassifier("resnet10t", n_classes=3, finetune=finetune, weights=weights).double())
    return models


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("finetune,weights", [("film", "file"), ("film", "random"), ("full", "random"), ("head", "file")])
def test_one_vmapped_step_equals_k_single_models(finetune, weights, weights_file):
    """float64: logits, every trainable gradient and (full mode) the updated running statistics of the ensemble equal K single models'."""
    models = single_models(finetune, weights_file if weights == "file" else "random")
    pool = torch.randint(0, 256, (10, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (10,))
    preprocess = ImagePreprocess(16, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ensemble = VectorisedImageClassifier(models, pool, labels, preprocess, partial(query_views, queries=((False, 0, 0), (True, 0, 0)))).double()
    if weights == "file" and finetune != "full":
        assert not ensemble.stacked_names and any(n.endswith("conv.weight") or n == "conv1.0.weight" for n in ensemble.shared_names)  # frozen weights stored once
    if finetune == "full":
        assert not ensemble.shared_names and any("running_mean" in n for n in ensemble.stacked_names)
    batch = torch.stack([torch.randperm(10)[:4] for _ in range(3)])
    for model in models:
        model.train()
    ensemble.train()
    loss = ensemble.training_step(batch, 0)
    loss.backward()
    x = preprocess(pool[batch.flatten()]).double().view(3, 4, 3, 16, 16)
    reference = [model(x[k]) for k, model in enumerate(models)]
    sum(F.cross_entropy(logits.float(), labels[batch[k]]) for k, logits in enumerate(reference)).backward()  # the loss in float32, as ClassifierSteps
    trained = dict(zip(ensemble.trainable_names, ensemble.trainable))
    for k, model in enumerate(models):
        named = dict(model.model.named_parameters())
        assert set(trained) == {n for n, p in named.items() if p.requires_grad}
        for name, stacked in trained.items():
            torch.testing.assert_close(stacked.grad[k], named[name].grad, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    for k, (single, unstacked) in enumerate(zip(models, ensemble.unstack())):
        assert type(unstacked) is ImageClassifier and dict(unstacked.hparams) == dict(single.hparams)
        for name, tensor in single.model.state_dict().items():  # running statistics: updated per model in full mode, frozen otherwise
            torch.testing.assert_close(unstacked.model.state_dict()[name].to(tensor.dtype), tensor, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    ensemble.eval()
    with torch.no_grad():
        predicted = ensemble.predict_step(torch.arange(10), 0)
        views = query_views(preprocess(pool).double(), ((False, 0, 0), (True, 0, 0)))
        expected = torch.stack([model.eval()(views.flatten(0, 1)).view(10, 2, 3) for model in models])
    torch.testing.assert_close(predicted, expected.float(), rtol=1e-5, atol=1e-5)


def image_setup(folder: Path, finetune: str, weights: str, precision: str = "32-true", img_size: int = 16, batch_size: int = 4, epochs: int = 2,
                **model_args) -> FarmSetup:
    data = ComponentSpec("mia_lightning.data.images.ImageDataModule", {
        "source": str(folder), "shots": 3, "backbone": "resnet10t", "weights": weights, "img_size": img_size, "queries": ["identity", "hflip"], "batch_size": batch_size})
    model = ComponentSpec("mia_lightning.models.image.ImageClassifier", {"finetune": finetune, "lr": 0.01, **model_args})
    return FarmSetup(data=data, model=model, trainer={**TRAINER, "max_epochs": epochs, "precision": precision})


FULL_BATCH = {"precision": "64-true", "img_size": 32, "batch_size": 9, "epochs": 3}
"""Full fine-tuning where the single model is not chaotic: float64, 32 px, every step on the model's 9 training images."""


@pytest.mark.parametrize("finetune,weights,args,tolerance", [
    ("film", "file", {}, 5e-4),
    ("full", "random", {**FULL_BATCH, "optimizer": "sgd"}, 2e-5),
    ("full", "file", {**FULL_BATCH, "optimizer": "sgd", "lr": 0.02, "weight_decay": 1e-3}, 2e-5),
])
def test_same_seeds_give_the_same_image_models(folder, weights_file, finetune, weights, args, tolerance):
    """Every tensor (running statistics included) and the pool logits of every query match the sequential Lightning farm (groups of 2 split 3 jobs).

    Tolerances are the single model's own rounding sensitivity. FiLM with Adam in float32 moves its
    tensors by up to 2e-5 between 1 and 2 threads (Adam divides tiny gradients by their own size):
    5e-4 on tensors, 1e-4 on logits. Full fine-tuning with train-mode BatchNorm over batches of 4 at
    16 px (1 x 1 pixels in the last stage) is chaotic: 0.2 on a running variance between 1 and 2
    threads, 1e-2 on weights even in float64 (the float32 loss of ``ClassifierSteps`` rounds). So it
    is compared on full batches at 32 px in float64 under SGD (with Adam single weights still moved
    by up to 2e-3); in float32 the single model's own oneDNN convolution gradient was measured 9e-3
    (relative) off the float64 value, where the ensemble's was 2e-6.
    """
    setup = image_setup(folder, finetune, weights_file if weights == "file" else "random", **args)
    keep = make_few_shot_plan(PlanSpec("x", N_IMAGES, 3, seed=1), setup.build_datamodule().pool_labels()).keep
    jobs = [ModelJob(i, np.flatnonzero(keep[i]), model_seed(1, i)) for i in range(3)]
    logits_tol = min(1e-4, tolerance)
    vectorised = assert_engines_agree(setup, jobs, ImageClassifier, (N_IMAGES, 2, 3), (tolerance, tolerance), (logits_tol, logits_tol))
    assert all(0.0 <= vec.metrics["train_acc"] <= 1.0 and 0.0 <= vec.metrics["val_acc"] <= 1.0 for vec in vectorised.values())
    assert not np.allclose(vectorised[0].logits, vectorised[1].logits, atol=1e-3)  # models differ: own seeds and subsets
    assert not np.allclose(vectorised[0].logits[:, 0], vectorised[0].logits[:, 1], atol=1e-3)  # the mirror view is another query


def pixel_recipe(tmp_path: Path, folder: Path, engine: str | None, weights: str) -> Path:
    """The head-feature recipe of test_images turned into FiLM fine-tuning on pixels (ImageDataModule + ImageClassifier)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = image_recipe(tmp_path, folder, **{"data.class_path": "mia_lightning.data.images.ImageDataModule", "data.init_args.weights": weights,
                                             "data.init_args.batch_size": 4, "model.class_path": "mia_lightning.models.image.ImageClassifier",
                                             "model.init_args": {"finetune": "film", "lr": 0.01}, "trainer.max_epochs": 2})
    recipe = yaml.safe_load(path.read_text())
    recipe["experiment"]["name"] = "pixels"
    if engine is None:
        recipe.pop("farm")
    else:
        recipe["farm"] = {"engine": engine, "group_size": 3}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_farm_vectorised_writes_what_the_sequential_farm_writes(tmp_path, folder):
    """``train.py farm`` with both engines on a FiLM recipe: same keep masks and labels, same files per model, logits to tolerance, done.json names the engine.

    Random backbone weights (an experiment may not name a local weights file, so ``train.py export``
    would refuse one): every model's frozen convolutions differ and the ensemble stacks them too.
    """
    experiments = {}
    for engine in ("sequential", "vectorised"):
        assert train_main(["farm", "--config", str(pixel_recipe(tmp_path / engine, folder, engine, "random"))]) == 0
        experiments[engine] = ExperimentDir(tmp_path / engine / "out" / "pixels")
    seq, vec = experiments["sequential"], experiments["vectorised"]
    assert_experiments_agree(seq, vec, 4)
    assert train_main(["export", "--experiment", str(vec.root)]) == 0  # the unstacked checkpoints reload and re-export the same logits
    for index in range(4):
        np.testing.assert_allclose(np.load(vec.model_dir(index) / "logits.npy"), np.load(seq.model_dir(index) / "logits.npy"), rtol=1e-4, atol=1e-4)


def test_cli_farm_auto_engine_trains_image_models_sequentially_on_the_cpu(tmp_path, folder, capsys):
    """``farm.engine: auto`` keeps the sequential farm for pixel fine-tuning on the CPU (slower there, README Farm) and says why."""
    assert train_main(["farm", "--config", str(pixel_recipe(tmp_path, folder, None, "random")), "--plan.n_models", "2"]) == 0
    assert "engine sequential (auto: the ImageClassifier ensemble is slower than the sequential farm on cpu" in " ".join(capsys.readouterr().out.split())
    experiment = ExperimentDir(tmp_path / "out" / "pixels")
    assert [yaml.safe_load((experiment.model_dir(i) / "done.json").read_text())["engine"] for i in range(2)] == ["sequential"] * 2
