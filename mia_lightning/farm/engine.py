"""How a farm trains models: the job description, the result, and the sequential Lightning engine.

An engine turns ``ModelJob``s (model index, training subset, seed) into ``TrainedModel``s (a
single-model LightningModule to checkpoint and its logits on the whole pool). The runner handles
claiming, resume and atomic writes, so engines only train and predict. ``engine: sequential`` runs
one Lightning ``Trainer.fit`` + ``Trainer.predict`` per model; ``engine: vectorised`` trains a group
of models at once (``mia_lightning.farm.vectorised``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch

from mia_lightning.contract.components import ComponentSpec
from mia_lightning.data.streams import check_batch_size
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.interrupts import call_trainer


ENGINES: dict[str, str] = {
    "sequential": "mia_lightning.farm.engine:SequentialEngine",
    "vectorised": "mia_lightning.farm.vectorised:VectorisedEngine",
    "unlearning": "mia_lightning.unlearning.engine:UnlearningEngine",
}
"""``farm.engine`` name -> ``module:Class``; an engine is built as ``Engine(setup, group_size=, progress=, experiment=)``."""

AUTO = "auto"
"""``farm.engine: auto`` (the default): the faster of ``vectorised`` and ``sequential`` for the recipe's family and device (``farm.vectorised.choose_engine``)."""


def check_trainer_stops(trainer: dict[str, Any]) -> None:
    """Refuse trainer limits under which the models never train (0) or never stop (max_epochs -1 without max_steps), before anything is written."""
    for key in ("max_epochs", "max_steps"):
        if trainer.get(key) == 0:
            raise MiaError(f"--trainer.{key} 0: the models would not train at all; give a positive value")
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) in (None, -1):
        raise MiaError("--trainer.max_epochs -1: without trainer.max_steps the models never stop training; give a positive max_epochs or set trainer.max_steps")


def resolve_engine(name: str, setup: FarmSetup, derived_models: bool = False) -> tuple[str, str | None]:
    """The ``ENGINES`` entry that ``farm.engine`` ``name`` trains with, and why when ``auto`` chose it (None for an engine named outright)."""
    if name != AUTO:
        return name, None
    from mia_lightning.farm.vectorised import choose_engine

    return choose_engine(setup, derived_models)


@dataclass(frozen=True)
class ModelJob:
    """One model of the farm: its index, its training subset of the pool, its seed and the model it derives from."""

    index: int
    train_indices: np.ndarray
    seed: int
    parent: int | None = None


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
    callbacks: tuple[ComponentSpec, ...] = ()
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_trainer_stops(self.trainer)
        if "batch_size" in self.data.init_args:
            check_batch_size(self.data.init_args["batch_size"], "--data.init_args.batch_size")

    def build_datamodule(self, job: ModelJob | None = None) -> L.LightningDataModule:
        """The DataModule for ``job`` (the whole pool without one), with the experiment's cache folder when it takes one."""
        extra = {"cache_dir": self.cache_dir} if self.cache_dir and self.data.accepts("cache_dir") else {}
        if job is None:
            return self.data.build(**extra)
        return self.data.build(train_indices=job.train_indices.tolist(), seed=job.seed, **extra)

    def build_model(self, datamodule: L.LightningDataModule, seed: int) -> L.LightningModule:
        """The model for ``datamodule``'s pool, initialised from ``seed`` (so every engine starts from the same weights)."""
        torch.manual_seed(seed)
        return self.model.build(**datamodule.model_kwargs())

    def build_callbacks(self) -> list[L.Callback]:
        """Fresh instances of the recipe's ``trainer.callbacks`` (one set per Lightning run)."""
        return [spec.build() for spec in self.callbacks]

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
    batches = call_trainer(trainer.predict, module, datamodule=datamodule)
    return torch.cat([b.float().cpu() for b in batches]).numpy()


class SequentialEngine:
    """One Lightning ``fit`` + ``predict`` per model (any LightningModule family).

    A job with a ``parent`` starts from the parent's trained weights (its checkpoint in the
    experiment) and continues training on its own subset: fine-tuning, online learning, or an
    inexact unlearning step.
    """

    trains_groups = False
    """The runner hands it one job at a time."""

    def __init__(
        self,
        setup: FarmSetup,
        group_size: int = 1,
        progress: Callable[[], list[L.Callback]] | None = None,
        experiment: ExperimentDir | None = None,
    ) -> None:
        self.setup = setup
        self.progress = progress
        self.experiment = experiment

    def warm_start(self, module: L.LightningModule, job: ModelJob) -> None:
        """Load the parent model's trained state into ``module`` (no-op for a job without parent)."""
        if job.parent is None:
            return
        if self.experiment is None:
            raise MiaError(f"model {job.index} derives from model {job.parent}, which needs the experiment directory")
        from mia_lightning.farm.checkpoints import load_model_checkpoint

        parent = load_model_checkpoint(self.experiment.model_dir(job.parent) / "model.ckpt", job.parent)
        module.load_state_dict(parent.state_dict())
        module.continues_from_parent = True  # modules keep state fitted on the parent's data (e.g. feature scaling)

    def run(self, jobs: list[ModelJob]) -> Iterator[TrainedModel]:
        for job in jobs:
            datamodule = self.setup.build_datamodule(job)
            module = self.setup.build_model(datamodule, job.seed)
            self.warm_start(module, job)
            progress = self.progress() if self.progress else []
            trainer = self.setup.build_trainer(callbacks=[*self.setup.build_callbacks(), *progress], enable_progress_bar=bool(progress))
            call_trainer(trainer.fit, module, datamodule=datamodule)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            predictor = self.setup.build_trainer(enable_progress_bar=False, devices=1)
            yield TrainedModel(job.index, module, predict_logits(predictor, module, datamodule), metrics)
