"""How a farm trains models: the job description, the result, and the sequential Lightning engine.

An engine turns ``ModelJob``s (model index, training subset, seed) into ``TrainedModel``s (a
single-model LightningModule to checkpoint and its logits on the whole pool). The runner handles
claiming, resume and atomic writes, so engines only train and predict. ``engine: sequential`` runs
one Lightning ``Trainer.fit`` + ``Trainer.predict`` per model; ``engine: vectorised`` trains a group
of models at once (``mia_lightning.farm.vectorised``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch

from mia_lightning.errors import MiaError


@dataclass(frozen=True)
class ComponentSpec:
    """A class to build by import path with keyword arguments (LightningCLI's class_path / init_args)."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> type:
        module_name, _, class_name = self.class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            raise MiaError(f"class_path {self.class_path!r}: cannot import it; check the spelling in the config") from None

    def build(self, **overrides: Any) -> Any:
        try:
            return self.resolve()(**{**self.init_args, **overrides})
        except (TypeError, ValueError) as err:
            raise MiaError(f"{self.class_path}: bad init_args ({err}); fix the config") from None


@dataclass(frozen=True)
class ModelJob:
    """One model of the farm: its index, its training subset of the pool and its seed."""

    index: int
    train_indices: np.ndarray
    seed: int


@dataclass
class TrainedModel:
    """What an engine hands back: a single-model module (checkpointed) and its pool logits float32 [n, Q, C]."""

    index: int
    module: L.LightningModule
    logits: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FarmSetup:
    """Everything an engine needs besides the jobs: how to build data, model and trainer."""

    data: ComponentSpec
    model: ComponentSpec
    trainer: dict[str, Any]

    def build_datamodule(self, job: ModelJob) -> L.LightningDataModule:
        return self.data.build(train_indices=job.train_indices.tolist(), seed=job.seed)

    def build_model(self, datamodule: L.LightningDataModule, seed: int) -> L.LightningModule:
        """The model for ``datamodule``'s pool, initialised from ``seed`` (so every engine starts from the same weights)."""
        torch.manual_seed(seed)
        return self.model.build(**datamodule.model_kwargs())

    def build_trainer(self, **overrides: Any) -> L.Trainer:
        kwargs = {
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **self.trainer,
            **overrides,
        }
        return L.Trainer(**kwargs)


def model_seed(plan_seed: int, index: int) -> int:
    """Per-model seed derived from the plan seed (independent streams for every model)."""
    return int(np.random.SeedSequence([plan_seed, index]).generate_state(1)[0])


def predict_logits(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> np.ndarray:
    """Export: ``Trainer.predict`` on the whole pool -> float32 [n, Q, C]."""
    batches = trainer.predict(module, datamodule=datamodule)
    return torch.cat([b.float().cpu() for b in batches]).numpy()


class SequentialEngine:
    """One Lightning ``fit`` + ``predict`` per model (any LightningModule family)."""

    def __init__(self, setup: FarmSetup, progress: Callable[[], list[L.Callback]] | None = None) -> None:
        self.setup = setup
        self.progress = progress

    def run(self, jobs: list[ModelJob]) -> Iterator[TrainedModel]:
        for job in jobs:
            datamodule = self.setup.build_datamodule(job)
            module = self.setup.build_model(datamodule, job.seed)
            callbacks = self.progress() if self.progress else []
            trainer = self.setup.build_trainer(callbacks=callbacks, enable_progress_bar=bool(callbacks))
            trainer.fit(module, datamodule=datamodule)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            predictor = self.setup.build_trainer(enable_progress_bar=False, devices=1)
            yield TrainedModel(job.index, module, predict_logits(predictor, module, datamodule), metrics)
