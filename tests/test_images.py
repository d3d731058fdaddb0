"""timm image workload: sources, few-shot pools and plan, query views, the three fine-tuning modes, cached head features, converters, bad input."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from mia_lightning.cli import attack_main, train_main
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.data import images
from mia_lightning.data.images import (
    ImagePool, ImagePreprocess, few_shot_pool, make_few_shot_plan, parse_query, query_view, read_idx,
)
from mia_lightning.data.plan import PlanSpec
from mia_lightning.errors import MiaError
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine
from mia_lightning.models.image import normalisation_layers
from mia_lightning.models.pretrained import create_backbone, positional_state_dict

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


def write_image_folder(root: Path, n_classes: int = 3, per_class: int = 8, size: int = 16, seed: int = 0, mode: str = "RGB") -> Path:
    """An ImageFolder tree of tiny PNGs: each class a base colour and a bright square at a class-dependent place, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3)) + np.array([40 * c, 120 - 30 * c, 80])
            top = (4 * c) % (size - 4)
            pixels[top : top + 4, top : top + 4] = 230
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            (image.convert("L") if mode == "L" else image).save(folder / f"{i:03d}.png")
    return root


def image_recipe(tmp_path: Path, folder: Path, **changes) -> Path:
    """A head-only farm recipe on the generated folder: random-init resnet10t at 16 px, cached features, linear heads."""
    recipe = {
        "experiment": {"name": "heads", "root": str(tmp_path / "out")},
        "plan": {"n_models": 4, "seed": 0, "kind": "few_shot"},
        "data": {"class_path": "mia_lightning.data.images.ImageFeatureDataModule",
                 "init_args": {"source": str(folder), "shots": 3, "backbone": "resnet10t", "weights": "random", "img_size": 16,
                               "queries": ["identity", "hflip", "shift:1:0"], "batch_size": 64}},
        "model": {"class_path": "mia_lightning.models.image.FeatureHead", "init_args": {"hidden": [], "lr": 0.05}},
        "trainer": {"max_epochs": 5, **{k: v for k, v in TRAINER.items() if k != "logger"}},
        "farm": {"engine": "vectorised", "group_size": 2},
    }
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def clear_caches() -> None:
    for cached in (images.load_images, images._computed_features, images._load_features, images.backbone_feature_count):
        cached.cache_clear()


# ------------------------------------------------------------------------------------- data pieces


def test_query_views_are_mirrors_and_reflect_padded_shifts():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    assert parse_query("identity") == (False, 0, 0) and parse_query("hflip+shift:2:-1") == (True, 2, -1)
    torch.testing.assert_close(query_view(x, parse_query("hflip")), x.flip(-1))
    right = query_view(x, parse_query("shift:1:0"))
    torch.testing.assert_close(right[..., 1:], x[..., :-1])  # content moved one pixel right
    torch.testing.assert_close(right[..., 0], x[..., 1])  # reflect padding (not edge replication)
    up = query_view(x, parse_query("shift:0:-1"))
    torch.testing.assert_close(up[..., :-1, :], x[..., 1:, :])
    torch.testing.assert_close(up[..., -1, :], x[..., -2, :])
    with pytest.raises(MiaError, match="not a query"):
        parse_query("rotate:10")


def test_preprocess_repeats_grey_channels_resizes_and_normalises():
    preprocess = ImagePreprocess(size=8, channels=3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    white = torch.full((2, 4, 4, 1), 255, dtype=torch.uint8)
    x = preprocess(white)
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))  # (1 - mean) / std per channel


def test_idx_files_and_mnist_pickles_are_read_as_data(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()))
    np.testing.assert_array_equal(read_idx(path), array)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()[:-1]))
    with pytest.raises(MiaError, match="truncated"):
        read_idx(path)
    hostile = pickle.dumps(((np.zeros(2), print),))
    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.print"):
        images._ArrayUnpickler(__import__("io").BytesIO(hostile)).load()


def test_few_shot_pool_and_plan_give_every_model_s_examples_per_class():
    rng = np.random.default_rng(0)
    source = ImagePool(rng.integers(0, 255, (300, 4, 4, 1), dtype=np.uint8), np.repeat(np.arange(6), 50), tuple("abcdef"))
    pool = few_shot_pool(source, shots=5, n_classes=4, classes=None, seed=3, max_samples=None)
    assert pool.images.shape[0] == 40 and np.bincount(pool.labels).tolist() == [10, 10, 10, 10] and len(pool.class_names) == 4
    again = few_shot_pool(source, shots=5, n_classes=4, classes=None, seed=3, max_samples=None)
    assert again.fingerprint() == pool.fingerprint()
    assert few_shot_pool(source, shots=5, n_classes=4, classes=None, seed=4, max_samples=None).fingerprint() != pool.fingerprint()
    plan = make_few_shot_plan(PlanSpec("x", 40, 8, seed=1), pool.labels)
    for c in range(4):
        per_model = plan.keep[:, pool.labels == c].sum(axis=1)
        assert (per_model == 5).all()  # exactly S of the 2S examples of every class per model
    assert (plan.keep.sum(axis=0) == 4).all()  # every example is IN for half of the models
    assert plan.info["shots"] == 5 and plan.info["n_classes"] == 4
    with pytest.raises(MiaError, match="needs 2 x 26 = 52 examples of every class"):
        few_shot_pool(source, shots=26, n_classes=2, classes=None, seed=0, max_samples=None)
    with pytest.raises(MiaError, match="n_population 6: .* multiple of 4"):
        make_few_shot_plan(PlanSpec("x", 40, 8, n_population=6), pool.labels)
    with pytest.raises(MiaError, match="even number of examples"):
        make_few_shot_plan(PlanSpec("x", 40, 8, n_population=4), pool.labels)  # 10 - 1 per class is odd
    public = make_few_shot_plan(PlanSpec("x", 40, 8, seed=1, n_population=8), pool.labels)
    assert np.bincount(pool.labels[public.population]).tolist() == [2, 2, 2, 2] and not public.keep[:, public.population].any()
    for c in range(4):
        assert (public.keep[:, pool.labels == c].sum(axis=1) == 4).all()  # S = 10 / 2 - 8 / (2 * 4) = 4 per class per model
    assert public.info["shots"] == 4 and public.info["population_per_class"] == 2


# ---------------------------------------------------------------------------- fine-tuning modes


def _image_setup(folder: Path, backbone: str, finetune: str) -> FarmSetup:
    data = ComponentSpec("mia_lightning.data.images.ImageDataModule", {
        "source": str(folder), "shots": 3, "backbone": backbone, "weights": "random", "img_size": 16 if backbone.startswith("resnet") else 32,
        "queries": ["identity", "hflip"], "batch_size": 8})
    model = ComponentSpec("mia_lightning.models.image.ImageClassifier",
                          {"finetune": finetune, "lr": 0.01, "model_args": {"patch_size": 8} if backbone.startswith("vit") else {}})
    return FarmSetup(data=data, model=model, trainer={**TRAINER, "max_epochs": 2})


@pytest.mark.parametrize("backbone", ["resnet10t", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("finetune", ["full", "head", "film"])
def test_each_mode_trains_only_its_parameters_and_exports_every_query(folder, backbone, finetune):
    setup = _image_setup(folder, backbone, finetune)
    datamodule = setup.build_datamodule()
    job = ModelJob(0, np.flatnonzero(make_few_shot_plan(PlanSpec("x", 18, 2), datamodule.pool_labels()).keep[0]), seed=7)
    initial = setup.build_model(datamodule, job.seed).state_dict()
    (trained,) = SequentialEngine(setup).run([job])
    assert trained.logits.shape == (18, 2, 3) and np.isfinite(trained.logits).all()
    model = trained.module.model
    head = {f"model.{name}" for name, _ in model.named_parameters() if name.startswith(model.default_cfg["classifier"])}
    norms = {id(p) for layer in normalisation_layers(model) for p in layer.parameters(recurse=False)}
    norm_names = {f"model.{name}" for name, p in model.named_parameters() if id(p) in norms}
    changed = {k for k, v in trained.module.state_dict().items() if v.is_floating_point() and not torch.equal(v, initial[k])}
    changed_params = changed & {f"model.{name}" for name, _ in model.named_parameters()}
    expected = {"head": head, "film": head | norm_names}.get(finetune)
    if expected is None:
        assert changed_params - head - norm_names  # full: convolution / attention weights move too
    else:
        assert changed_params == expected
    if finetune != "full":  # the frozen backbone keeps its running statistics
        assert not {k for k in changed if "running_" in k}
    flipped = trained.module.eval()(datamodule.predict_dataloader().collate_fn([datamodule.predict_dataloader().dataset[0]])[0][:, 1])
    np.testing.assert_allclose(trained.logits[0, 1], flipped[0].detach().numpy(), rtol=1e-4, atol=1e-4)  # query 1 is the mirror image


def test_per_sample_gradient_norms_match_a_plain_backward_loop(folder):
    setup = _image_setup(folder, "resnet10t", "film")
    datamodule = setup.build_datamodule()
    module = setup.build_model(datamodule, 0).eval()
    norms = module.per_sample_gradient_norms(datamodule)
    x, y = next(iter(datamodule.pool_dataloader(batch_size=4)))
    for i in range(3):
        module.zero_grad()
        torch.nn.functional.cross_entropy(module(x[i : i + 1]), y[i : i + 1]).backward()
        expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in module.trainable_parameters())).item()
        assert norms[i] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------- cached head features


def test_head_mode_runs_the_backbone_once_per_experiment(tmp_path, folder, monkeypatch):
    """4 heads, 2 groups, an export and an attack: the backbone sees every (image, query) exactly once."""
    seen = {"images": 0}
    real = images.create_backbone

    def counting(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: seen.__setitem__("images", seen["images"] + inputs[0].shape[0]))
        return model

    monkeypatch.setattr(images, "create_backbone", counting)
    clear_caches()
    recipe = image_recipe(tmp_path, folder)
    assert train_main(["farm", "--config", str(recipe)]) == 0
    experiment = tmp_path / "out" / "heads"
    assert seen["images"] == 18 * 3  # 3 classes x 2 x 3 shots, 3 queries: one pass for the whole farm
    logits = np.load(experiment / "models" / "0003" / "logits.npy")
    assert logits.shape == (18, 3, 3)
    assert len(list((experiment / "cache").glob("features-*.npy"))) == 1
    clear_caches()  # a new process: the features come from the experiment's cache file
    assert train_main(["export", "--experiment", str(experiment)]) == 0
    assert seen["images"] == 18 * 3
    np.testing.assert_allclose(np.load(experiment / "models" / "0003" / "logits.npy"), logits, rtol=1e-5, atol=1e-4)  # per-model matmul vs batched
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "rmia", "--bootstrap", "0"]) == 0
    assert (experiment / "attacks" / "lira_online" / "results.json").is_file()


def test_vectorised_heads_equal_sequential_heads_on_every_query(folder):
    data = ComponentSpec("mia_lightning.data.images.ImageFeatureDataModule",
                         {"source": str(folder), "shots": 3, "backbone": "resnet10t", "weights": "random", "img_size": 16, "queries": ["identity", "hflip"], "batch_size": 4})
    setup = FarmSetup(data=data, model=ComponentSpec("mia_lightning.models.image.FeatureHead", {"hidden": [], "lr": 0.05}), trainer={**TRAINER, "max_epochs": 3})
    keep = make_few_shot_plan(PlanSpec("x", 18, 3), setup.build_datamodule().pool_labels()).keep
    jobs = [ModelJob(i, np.flatnonzero(keep[i]), model_seed(0, i)) for i in range(3)]
    sequential = {r.index: r for r in SequentialEngine(setup).run(jobs)}
    vectorised = {r.index: r for r in VectorisedEngine(setup, group_size=2).run(jobs)}
    for i in range(3):
        assert vectorised[i].logits.shape == sequential[i].logits.shape == (18, 2, 3)
        np.testing.assert_allclose(vectorised[i].logits, sequential[i].logits, rtol=1e-5, atol=1e-5)
        assert not np.allclose(vectorised[i].logits[:, 0], vectorised[i].logits[:, 1])  # the mirror view is a different query


# ------------------------------------------------------------------------------------ weights


def test_positional_conversion_loads_through_timm_file_overlay(tmp_path):
    source_model = timm.create_model("resnet10t", pretrained=False)
    foreign = {f"features.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(source_model.state_dict().items())}  # other names, same order
    converted = positional_state_dict(foreign, timm.create_model("resnet10t", pretrained=False), "foreign.pth")
    path = tmp_path / "resnet10t.pth"
    torch.save(converted, path)
    loaded = create_backbone("resnet10t", str(path), num_classes=5)
    for name, tensor in source_model.state_dict().items():
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    assert loaded.fc.out_features == 5  # timm re-initialised the classifier for 5 classes
    with pytest.raises(MiaError, match="another architecture"):
        positional_state_dict(foreign, timm.create_model("resnet14t", pretrained=False), "foreign.pth")


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,phrase", [
    ("unknown_backbone", "not a timm model name"),
    ("foreign_weights", "weights are for another architecture"),
    ("corrupt_image", "not a readable image"),
    ("too_many_shots", "needs 2 x 9 = 18 examples of every class"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, folder, capsys, case, phrase):
    clear_caches()
    changes = {}
    if case == "unknown_backbone":
        changes["data.init_args.backbone"] = "resnet_nonsense"
    elif case == "foreign_weights":
        weights = tmp_path / "vit.pth"
        torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).state_dict(), weights)
        changes["data.init_args.weights"] = str(weights)
    elif case == "corrupt_image":
        (folder / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    else:
        changes["data.init_args.shots"] = 9
    assert train_main(["farm", "--config", str(image_recipe(tmp_path, folder, **changes))]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
