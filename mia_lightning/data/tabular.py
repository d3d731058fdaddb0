"""Tabular data: loading a pool (scikit-learn bundled sets by name, or a CSV path) and its DataModule."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mia_lightning.data.streams import MembershipBatches, balanced_half, check_batch_size
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

    def fingerprint(self) -> str:
        """sha256 of the pool's content (features, labels, class names): an edited data file changes it."""
        digest = hashlib.sha256()
        for array in (self.features, self.labels):
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update("\x00".join(self.class_names).encode())
        return digest.hexdigest()


def _load_bundled(name: str) -> TabularPool:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = tuple(str(c) for c in getattr(bunch, "target_names", np.unique(bunch.target)))
    return TabularPool(bunch.data.astype(np.float32), bunch.target.astype(np.int64), names)


MISSING_TOKENS = frozenset({"", "?", "na", "n/a", "nan", "null", "none"})
"""Field values read as missing (case-insensitive)."""

MISSING_POLICIES = ("error", "drop", "mean")


def _read_rows(path: Path) -> list[list[str]]:
    """CSV rows with surrounding spaces stripped (UTF-8, with or without a byte-order mark)."""
    if not path.is_file():
        raise MiaError(f"{path}: no such CSV file; pass a CSV path or one of {', '.join(BUNDLED)}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [[field.strip() for field in row] for row in csv.reader(handle, skipinitialspace=True) if row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise MiaError(f"{path}: not a readable UTF-8 CSV ({err})") from None


def _numeric(values: list[str], present: np.ndarray) -> np.ndarray | None:
    """float32 column (NaN where missing) when every present value is a number, else None."""
    column = np.full(len(values), np.nan, dtype=np.float32)
    try:
        column[present] = np.asarray([v for v, ok in zip(values, present) if ok], dtype=np.float32)
    except ValueError:
        return None
    return column


def _load_csv(path: Path, label_column: str, missing: str = "error") -> TabularPool:
    """Numeric columns as-is, other columns one-hot encoded; the label column's values become classes.

    ``?``, empty fields and NA-like values are missing: ``missing="error"`` refuses them naming the
    column and row, ``"drop"`` drops those rows, ``"mean"`` fills a numeric column with its mean and
    a categorical one with its most frequent value (a missing label always drops or refuses the row).
    """
    if missing not in MISSING_POLICIES:
        raise MiaError(f"data.missing {missing!r}: choose one of {', '.join(MISSING_POLICIES)}")
    rows = _read_rows(path)
    if len(rows) < 3:
        raise MiaError(f"{path}: needs a header row and at least two data rows")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise MiaError(f"{path}: no label column {label_column!r} in header {header}; set data.label_column")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise MiaError(f"{path}:{number}: {len(row)} fields, header has {len(header)}; fix or remove that row")
    table = np.asarray(body, dtype=object)
    absent = np.vectorize(lambda v: v.lower() in MISSING_TOKENS, otypes=[bool])(table)
    if absent.any() and missing == "error":
        row, col = (int(i) for i in np.argwhere(absent)[0])
        raise MiaError(
            f"{path}:{row + 2}: column {header[col]!r} is missing ({table[row, col]!r}); {int(absent.any(axis=1).sum())} rows have "
            "missing values: set data.missing to drop or mean, or clean the file"
        )
    label_at = header.index(label_column)
    keep_rows = ~absent.any(axis=1) if missing == "drop" else ~absent[:, label_at]
    table, absent = table[keep_rows], absent[keep_rows]
    if len(table) < 2:
        raise MiaError(f"{path}: fewer than two rows left after dropping rows with missing values")
    label_values = [str(v) for v in table[:, label_at]]
    classes = tuple(sorted(set(label_values)))
    if len(classes) < 2:
        raise MiaError(f"{path}: label column {label_column!r} has a single value; need at least two classes")
    blocks = []
    for col, name in enumerate(header):
        if col == label_at:
            continue
        values, present = [str(v) for v in table[:, col]], ~absent[:, col]
        if not present.any():
            raise MiaError(f"{path}: column {name!r} has no values; drop it")
        numbers = _numeric(values, present)
        if numbers is not None:
            numbers[~present] = numbers[present].mean()
            blocks.append(numbers[:, None])
            continue
        observed = [v for v, ok in zip(values, present) if ok]
        categories, counts = np.unique(observed, return_counts=True)
        if len(categories) > 0.5 * len(values) and len(values) > 20:
            raise MiaError(f"{path}: column {name!r} is neither numeric nor categorical ({len(categories)} distinct values); drop it")
        filled = np.where(present, np.asarray(values, dtype=object), categories[np.argmax(counts)])
        blocks.append((filled[:, None] == categories[None, :]).astype(np.float32))
    features = np.concatenate(blocks, axis=1)
    if not np.isfinite(features).all():
        raise MiaError(f"{path}: infinite feature values; clip or drop them first")
    labels = np.searchsorted(np.asarray(classes), np.asarray(label_values)).astype(np.int64)
    return TabularPool(features, labels, classes)


@lru_cache(maxsize=4)
def load_tabular(source: str, label_column: str | None = None, missing: str = "error") -> TabularPool:
    """Load a bundled scikit-learn dataset by name, or a CSV file with a ``label_column``."""
    if source in BUNDLED:
        return _load_bundled(source)
    if label_column is None:
        raise MiaError(f"data source {source!r}: a CSV needs data.label_column (bundled sets: {', '.join(BUNDLED)})")
    return _load_csv(Path(source), label_column, missing)


def _mean_std(features: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.astype(np.float64)
    return torch.from_numpy(x.mean(0)).float(), torch.from_numpy(x.std(0)).float()


class TabularDataModule(MembershipBatches, L.LightningDataModule):
    """Trains one model on its membership subset of a tabular pool; predicts on the whole pool.

    ``train_indices`` is the model's training subset (from the plan's keep row); without it a
    seeded random half of the pool is used, so ``train.py fit`` trains a stand-alone target. Each
    epoch has ``ceil(len(train) / batch_size)`` steps drawn from a seeded stream of permutations
    (the same stream the vectorised ensemble uses).
    """

    DATA_ARGS = {"source": BUNDLED}
    """Arguments that name a dataset, with the built-in words each accepts; other values are paths (``contract.data_sources``)."""

    def __init__(
        self,
        source: str = "digits",
        label_column: str | None = None,
        missing: str = "error",
        batch_size: int = 64,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        self.save_hyperparameters()
        self.pool = load_tabular(source, label_column, missing)
        n = len(self.pool.labels)
        self.train_indices = np.asarray(train_indices if train_indices is not None else balanced_half(n, seed), dtype=np.int64)
        if self.train_indices.size == 0 or self.train_indices.min() < 0 or self.train_indices.max() >= n:
            raise MiaError(f"train_indices must be non-empty ids in [0, {n})")

    @property
    def dataset_id(self) -> str:
        """Name of the pool recorded in plan.json."""
        return self.hparams.source

    def fingerprint(self) -> str:
        """Content hash of the pool (recorded in plan.json; every farm process checks it)."""
        return self.pool.fingerprint()

    def model_kwargs(self) -> dict[str, int]:
        """Model arguments the data decides (linked into the model like LightningCLI's link_arguments)."""
        return {"n_features": self.pool.n_features, "n_classes": self.pool.n_classes}

    def pool_labels(self) -> np.ndarray:
        """int64 [n] labels of the audit pool (written as labels.npy)."""
        return self.pool.labels

    def pool_features(self) -> np.ndarray:
        """float32 [n, d]: every pool sample's features in pool order (what input-modelling attacks such as quantile regression read)."""
        return self.pool.features

    def train_feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the features over this model's training subset only (no leakage from the pool)."""
        return _mean_std(self.pool.features[self.train_indices])

    def pool_feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std over the whole audit pool: the same for every model whatever it trained on (the scaling under DP-SGD)."""
        return _mean_std(self.pool.features)

    def _dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.pool.features), torch.from_numpy(self.pool.labels))

    def train_dataloader(self) -> DataLoader:
        """The seeded stream of minibatches, or Poisson-sampled batches once DP-SGD asked for them."""
        return DataLoader(self._dataset(), batch_sampler=self.train_batch_sampler(), num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Held-out part of the pool (not in this model's training subset): utility of the model."""
        held_out = np.setdiff1d(np.arange(len(self.pool.labels)), self.train_indices)
        dataset = TensorDataset(torch.from_numpy(self.pool.features[held_out]), torch.from_numpy(self.pool.labels[held_out]))
        return DataLoader(dataset, batch_size=1024, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The whole audit pool, in pool order (what the attacker queries)."""
        return DataLoader(self._dataset(), batch_size=1024, shuffle=False, num_workers=self.hparams.num_workers)
