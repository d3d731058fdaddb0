"""The experiment directory: the contract between plan, farm, export and attack stages.

Layout (see README): ``config.yaml``, ``plan.json``, ``keep.npy``, ``labels.npy``, optional
``population.npy``, ``models/NNNN/{model.ckpt,logits.npy|signal.npy,done.json}`` and
``attacks/<name>/{results.json,scores.npy,roc.png}``. Only ``keep.npy``, ``labels.npy`` and the
per-model ``logits.npy`` (or ``signal.npy``) are required by the attacks, so a directory exported
by any framework can be audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.io import load_json, load_npy

FORMAT_VERSION = 1
"""Version of the directory layout written into ``plan.json``; attacks refuse other versions."""

LOGITS_FILE = "logits.npy"
SIGNAL_FILE = "signal.npy"


def model_dirname(index: int) -> str:
    """Zero-padded folder name of model ``index``."""
    return f"{index:04d}"


@dataclass(frozen=True)
class ExperimentDir:
    """Paths inside one experiment directory and checked loaders for its arrays."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    @property
    def keep_path(self) -> Path:
        return self.root / "keep.npy"

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.npy"

    @property
    def population_path(self) -> Path:
        return self.root / "population.npy"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def attacks_dir(self) -> Path:
        return self.root / "attacks"

    def model_dir(self, index: int) -> Path:
        return self.models_dir / model_dirname(index)

    def attack_dir(self, name: str) -> Path:
        return self.attacks_dir / name

    def check_exists(self) -> None:
        """Fail with a clear message when the directory is not an experiment at all."""
        if not self.root.is_dir():
            raise MiaError(f"{self.root}: no such experiment directory; run `python train.py farm --config ...` first")
        if not self.keep_path.is_file():
            raise MiaError(
                f"{self.keep_path}: missing; an experiment directory needs keep.npy, labels.npy and models/*/logits.npy"
            )

    def check_version(self) -> None:
        """Refuse a ``plan.json`` written by another layout version (absent plan.json is fine)."""
        if not self.plan_path.is_file():
            return
        plan = load_json(self.plan_path)
        version = plan.get("version") if isinstance(plan, dict) else None
        if version != FORMAT_VERSION:
            raise MiaError(
                f"{self.plan_path}: experiment layout version {version!r}, this mia-lightning reads version "
                f"{FORMAT_VERSION}; re-export it with a matching version or re-run the farm in a new directory"
            )

    @cached_property
    def keep(self) -> np.ndarray:
        """bool [n_models, n_samples] membership matrix."""
        keep = load_npy(self.keep_path, "membership matrix", "re-run `python train.py plan` or export keep.npy as bool [n_models, n_samples]")
        if keep.ndim != 2 or keep.shape[0] < 1:
            raise MiaError(f"{self.keep_path}: expected a 2-D bool array [n_models, n_samples], got shape {keep.shape}")
        if keep.dtype != np.bool_:
            if not np.issubdtype(keep.dtype, np.integer) or not np.isin(keep, (0, 1)).all():
                raise MiaError(f"{self.keep_path}: expected bool (or 0/1) values, got dtype {keep.dtype}")
            keep = keep.astype(bool)
        return keep

    @cached_property
    def labels(self) -> np.ndarray:
        """int64 [n_samples] class labels of the audit pool."""
        labels = load_npy(self.labels_path, "labels", "export labels.npy as int64 [n_samples]")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise MiaError(f"{self.labels_path}: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        if labels.shape[0] != self.keep.shape[1]:
            raise MiaError(
                f"{self.labels_path}: {labels.shape[0]} labels but keep.npy has {self.keep.shape[1]} samples; "
                "both must describe the same audit pool"
            )
        if (labels < 0).any():
            raise MiaError(f"{self.labels_path}: negative labels; labels must be class indices 0..C-1")
        return labels.astype(np.int64)

    @cached_property
    def population(self) -> np.ndarray | None:
        """Optional int64 ids of samples no model trains on (RMIA's population)."""
        if not self.population_path.is_file():
            return None
        ids = load_npy(self.population_path, "population ids", "delete it or save int64 sample ids")
        n = self.keep.shape[1]
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any() or (ids >= n).any():
            raise MiaError(f"{self.population_path}: expected 1-D int ids in [0, {n}), got shape {ids.shape} dtype {ids.dtype}")
        if self.keep[:, ids].any():
            raise MiaError(f"{self.population_path}: some population samples are in a model's training set (keep.npy)")
        return ids.astype(np.int64)

    def load_model_outputs(self, kind: str) -> np.ndarray:
        """Stack every model's exported outputs: ``kind='logits'`` -> float32 [M, n, Q, C]; ``'signal'`` -> [M, n, Q].

        ``signal.npy`` holds a per-sample scalar confidence (higher = more member-like, e.g. a
        negative MLM loss) for model families whose outputs are not class logits.
        """
        filename = LOGITS_FILE if kind == "logits" else SIGNAL_FILE
        expected_ndim = 3 if kind == "logits" else 2
        n_models, n_samples = self.keep.shape
        stacked = None
        fix = f"re-run `python train.py export --experiment {self.root}` or write it as float32 [n_samples, n_queries{', n_classes' if kind == 'logits' else ''}]"
        for index in range(n_models):
            path = self.model_dir(index) / filename
            array = load_npy(path, f"model {index} {kind}", fix)
            if array.ndim != expected_ndim or array.shape[0] != n_samples:
                raise MiaError(
                    f"{path}: shape {array.shape}, expected [{n_samples}, n_queries{', n_classes' if kind == 'logits' else ''}] "
                    f"to match keep.npy's {n_samples} samples; {fix}"
                )
            if not np.issubdtype(array.dtype, np.floating):
                raise MiaError(f"{path}: dtype {array.dtype}, expected floating point; {fix}")
            if stacked is None:
                stacked = np.empty((n_models, *array.shape), dtype=np.float32 if kind == "logits" else np.float64)
            elif array.shape != stacked.shape[1:]:
                raise MiaError(f"{path}: shape {array.shape} differs from model 0's {stacked.shape[1:]}; all models must be exported alike")
            bad = ~np.isfinite(array)
            if bad.any():
                raise MiaError(
                    f"{path}: {int(bad.sum())} NaN/inf values (first at index {tuple(int(i) for i in np.argwhere(bad)[0])}); "
                    "the model diverged or the export is broken, retrain or re-export this model"
                )
            stacked[index] = array
        if kind == "logits":
            n_classes = stacked.shape[-1]
            if self.labels.max() >= n_classes:
                raise MiaError(f"{self.labels_path}: label {int(self.labels.max())} out of range for logits with {n_classes} classes")
        return stacked

    def output_kind(self) -> str:
        """'logits' when model 0 exported logits, 'signal' when it exported a scalar signal."""
        first = self.model_dir(0)
        if (first / LOGITS_FILE).is_file():
            return "logits"
        if (first / SIGNAL_FILE).is_file():
            return "signal"
        raise MiaError(
            f"{first}: holds neither {LOGITS_FILE} nor {SIGNAL_FILE}; train and export the models first "
            f"(`python train.py farm ...` or `python train.py export --experiment {self.root}`)"
        )
