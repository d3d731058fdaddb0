"""Tabular data: loading a pool (scikit-learn bundled sets by name, or a CSV path) and its DataModule."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mia_lightning.data.streams import StreamBatchSampler, balanced_half
from mia_lightning.errors import MiaError

BUNDLED = ("digits", "breast_cancer", "wine", "iris")


@dataclass(frozen=True)
class TabularPool:
    """The audit pool: float32 features [n, d] and int64 labels [n] (classes 0..C-1)."""

    features: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _load_bundled(name: str) -> TabularPool:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = tuple(str(c) for c in getattr(bunch, "target_names", np.unique(bunch.target)))
    return TabularPool(bunch.data.astype(np.float32), bunch.target.astype(np.int64), names)


def _load_csv(path: Path, label_column: str) -> TabularPool:
    """Numeric columns as-is, other columns one-hot encoded; the label column's values become classes."""
    if not path.is_file():
        raise MiaError(f"{path}: no such CSV file; pass a CSV path or one of {', '.join(BUNDLED)}")
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle, skipinitialspace=True) if row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise MiaError(f"{path}: not a readable CSV ({err})") from None
    if len(rows) < 3:
        raise MiaError(f"{path}: needs a header row and at least two data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if label_column not in header:
        raise MiaError(f"{path}: no label column {label_column!r} in header {header}; set data.label_column")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise MiaError(f"{path}:{number}: {len(row)} fields, header has {len(header)}; fix or remove that row")
    columns = list(zip(*body))
    label_values = [v.strip() for v in columns[header.index(label_column)]]
    classes = tuple(sorted(set(label_values)))
    if len(classes) < 2:
        raise MiaError(f"{path}: label column {label_column!r} has a single value; need at least two classes")
    blocks = []
    for name, values in zip(header, columns):
        if name == label_column:
            continue
        values = [v.strip() for v in values]
        try:
            blocks.append(np.asarray(values, dtype=np.float32)[:, None])
        except ValueError:
            categories = sorted(set(values))
            if len(categories) > 0.5 * len(values) and len(values) > 20:
                raise MiaError(f"{path}: column {name!r} is neither numeric nor categorical ({len(categories)} distinct values); drop it") from None
            blocks.append((np.asarray(values)[:, None] == np.asarray(categories)[None, :]).astype(np.float32))
    features = np.concatenate(blocks, axis=1)
    if not np.isfinite(features).all():
        raise MiaError(f"{path}: NaN or infinite feature values; impute or drop them first")
    labels = np.searchsorted(np.asarray(classes), np.asarray(label_values)).astype(np.int64)
    return TabularPool(features, labels, classes)


@lru_cache(maxsize=4)
def load_tabular(source: str, label_column: str | None = None) -> TabularPool:
    """Load a bundled scikit-learn dataset by name, or a CSV file with a ``label_column``."""
    if source in BUNDLED:
        return _load_bundled(source)
    if label_column is None:
        raise MiaError(f"data source {source!r}: a CSV needs data.label_column (bundled sets: {', '.join(BUNDLED)})")
    return _load_csv(Path(source), label_column)


class TabularDataModule(L.LightningDataModule):
    """Trains one model on its membership subset of a tabular pool; predicts on the whole pool.

    ``train_indices`` is the model's training subset (from the plan's keep row); without it a
    seeded random half of the pool is used, so ``train.py fit`` trains a stand-alone target. Each
    epoch has ``ceil(len(train) / batch_size)`` steps drawn from a seeded stream of permutations
    (the same stream the vectorised ensemble uses).
    """

    def __init__(
        self,
        source: str = "digits",
        label_column: str | None = None,
        batch_size: int = 64,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.pool = load_tabular(source, label_column)
        n = len(self.pool.labels)
        self.train_indices = np.asarray(train_indices if train_indices is not None else balanced_half(n, seed), dtype=np.int64)
        if self.train_indices.size == 0 or self.train_indices.min() < 0 or self.train_indices.max() >= n:
            raise MiaError(f"train_indices must be non-empty ids in [0, {n})")

    @property
    def dataset_id(self) -> str:
        """Name of the pool recorded in plan.json."""
        return self.hparams.source

    def model_kwargs(self) -> dict[str, int]:
        """Model arguments the data decides (linked into the model like LightningCLI's link_arguments)."""
        return {"n_features": self.pool.n_features, "n_classes": self.pool.n_classes}

    def pool_labels(self) -> np.ndarray:
        """int64 [n] labels of the audit pool (written as labels.npy)."""
        return self.pool.labels

    def train_feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the features over this model's training subset only (no leakage from the pool)."""
        x = self.pool.features[self.train_indices].astype(np.float64)
        return torch.from_numpy(x.mean(0)).float(), torch.from_numpy(x.std(0)).float()

    def _dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.pool.features), torch.from_numpy(self.pool.labels))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StreamBatchSampler(self.train_indices, self.hparams.batch_size, seed=self.hparams.seed, rank=rank, world_size=world)
        return DataLoader(self._dataset(), batch_sampler=sampler, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Held-out part of the pool (not in this model's training subset): utility of the model."""
        held_out = np.setdiff1d(np.arange(len(self.pool.labels)), self.train_indices)
        dataset = TensorDataset(torch.from_numpy(self.pool.features[held_out]), torch.from_numpy(self.pool.labels[held_out]))
        return DataLoader(dataset, batch_size=1024, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The whole audit pool, in pool order (what the attacker queries)."""
        return DataLoader(self._dataset(), batch_size=1024, shuffle=False, num_workers=self.hparams.num_workers)
