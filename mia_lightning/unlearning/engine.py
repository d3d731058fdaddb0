"""``farm.engine: unlearning``: trains the models of an unlearning plan as ``unlearning.json`` says (its ``training`` map).

- no entry: an ordinary model from scratch (the vectorised engine for the tabular MLP, else the
  sequential one), e.g. originals and exact retrains;
- ``finetune``: starts from the parent model's trained weights and trains ``epochs`` epochs on its
  own keep row (what remains after the deletion): inexact unlearning by fine-tuning;
- ``gradient_ascent``: starts from the parent and takes ``steps`` gradient *ascent* steps on the
  ``forget`` samples (the loss's gradient is negated after every backward pass);
- ``sisa``: a SISA shard model (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): stage r
  trains ``trainer.max_epochs`` epochs on slices 1..r and the state after every slice but the last
  is checkpointed under ``models/NNNN/slices/``. With ``resume_after: r`` the model starts from the
  parent's checkpoint after slice r and trains only stages r+1..R: unlearning retrains the affected
  shard from the affected slice on. Each stage is its own ``Trainer.fit`` (a fresh optimiser), so a
  resumed model follows exactly the procedure of one trained from scratch without the deleted
  samples; feature scaling is fitted on slice 1 only and kept (``continues_from_parent``).

Every model reports its optimiser steps in ``done.json`` (``metrics.optimizer_steps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import numpy as np

from mia_lightning.data.tabular import TabularDataModule
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.checkpoints import load_model_checkpoint, save_model_checkpoint
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine, TrainedModel, predict_logits
from mia_lightning.interrupts import call_trainer
from mia_lightning.models.tabular_mlp import TabularMLP
from mia_lightning.unlearning.contract import load_unlearning

SLICES_DIR = "slices"


def slice_checkpoint(experiment: ExperimentDir, index: int, stage: int) -> Path:
    """Where model ``index`` keeps its state after slice ``stage`` (1-based)."""
    return experiment.model_dir(index) / SLICES_DIR / f"slice-{stage:03d}.ckpt"


class NegatedGradients(L.Callback):
    """Turns gradient descent into gradient ascent: every gradient is negated right after the backward pass."""

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for parameter in pl_module.parameters():
            if parameter.grad is not None:
                parameter.grad.neg_()


def _accuracy(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    return float((logits[ids, :, :].mean(axis=1).argmax(-1) == labels[ids]).mean()) if ids.size else float("nan")


class UnlearningEngine:
    """Trains originals, exact retrains, SISA shard models and inexact unlearned models of one experiment."""

    trains_groups = True
    """The runner hands it ``farm.group_size`` jobs at a time (exact retrains go to the vectorised engine)."""

    def __init__(
        self,
        setup: FarmSetup,
        group_size: int = 64,
        progress: Callable[[], list[L.Callback]] | None = None,
        experiment: ExperimentDir | None = None,
    ) -> None:
        if experiment is None:
            raise MiaError("farm.engine unlearning needs the experiment directory (it reads unlearning.json and the parents' checkpoints)")
        self.setup, self.progress, self.experiment = setup, progress, experiment
        self.training = load_unlearning(experiment).training
        vectorisable = issubclass(setup.model.resolve(), TabularMLP) and issubclass(setup.data.resolve(), TabularDataModule) and not setup.callbacks
        if vectorisable:
            from mia_lightning.farm.vectorised import VectorisedEngine

            self.scratch = VectorisedEngine(setup, group_size=group_size, progress=progress, experiment=experiment)
        else:
            self.scratch = SequentialEngine(setup, progress=progress, experiment=experiment)

    def run(self, jobs: list[ModelJob]) -> Iterator[TrainedModel]:
        plain = [job for job in jobs if job.index not in self.training]
        if plain:
            yield from self.scratch.run(plain)
        for job in jobs:
            entry = self.training.get(job.index)
            if entry is None:
                continue
            method = entry["method"]
            if method == "sisa":
                yield self._sisa(job, entry)
            elif method == "finetune":
                yield self._finetune(job, int(entry["epochs"]))
            elif method == "gradient_ascent":
                yield self._gradient_ascent(job, np.asarray(entry["forget"], dtype=np.int64), int(entry["steps"]))
            else:
                raise MiaError(f"unlearning.json: model {job.index} has training method {method!r}; the unlearning engine trains sisa, finetune and gradient_ascent models")

    def _callbacks(self, *extra: L.Callback) -> list[L.Callback]:
        return [*self.setup.build_callbacks(), *extra, *(self.progress() if self.progress else [])]

    def _trainer(self, *extra: L.Callback, **overrides) -> L.Trainer:
        callbacks = self._callbacks(*extra)
        return self.setup.build_trainer(callbacks=callbacks, enable_progress_bar=bool(self.progress), limit_val_batches=0, **overrides)

    def _from_checkpoint(self, module: L.LightningModule, path: Path, owner: int) -> None:
        """Load model ``owner``'s state saved at ``path`` into ``module``; it then keeps the scaling fitted before (no refit)."""
        module.load_state_dict(load_model_checkpoint(path, owner).state_dict())
        module.continues_from_parent = True

    def _parent(self, job: ModelJob) -> int:
        if job.parent is None:
            raise MiaError(f"unlearning.json: model {job.index} derives from another model but plan.json names no parent for it; re-plan the experiment")
        return job.parent

    def _result(self, job: ModelJob, module: L.LightningModule, datamodule: L.LightningDataModule, steps: int, **extra: float) -> TrainedModel:
        predictor = self.setup.build_trainer(enable_progress_bar=False, devices=1)
        logits = predict_logits(predictor, module, datamodule)
        labels = np.asarray(datamodule.pool_labels())
        held_out = np.setdiff1d(np.arange(labels.size), job.train_indices)
        metrics = {"optimizer_steps": float(steps), **extra}
        if logits.ndim == 3:
            metrics |= {"train_acc": _accuracy(logits, labels, job.train_indices), "val_acc": _accuracy(logits, labels, held_out)}
        return TrainedModel(job.index, module, logits, metrics)

    def _finetune(self, job: ModelJob, epochs: int) -> TrainedModel:
        """The parent fine-tuned for ``epochs`` epochs on this model's keep row (the retained data)."""
        datamodule = self.setup.build_datamodule(job)
        module = self.setup.build_model(datamodule, job.seed)
        parent = self._parent(job)
        self._from_checkpoint(module, self.experiment.model_dir(parent) / "model.ckpt", parent)
        trainer = self._trainer(max_epochs=epochs, max_steps=-1)
        call_trainer(trainer.fit, module, datamodule=datamodule)
        return self._result(job, module, datamodule, trainer.global_step)

    def _gradient_ascent(self, job: ModelJob, forget: np.ndarray, steps: int) -> TrainedModel:
        """The parent after ``steps`` gradient-ascent steps on the forgotten samples (minibatches drawn from them)."""
        datamodule = self.setup.build_datamodule(ModelJob(job.index, forget, job.seed, job.parent))
        module = self.setup.build_model(datamodule, job.seed)
        parent = self._parent(job)
        self._from_checkpoint(module, self.experiment.model_dir(parent) / "model.ckpt", parent)
        trainer = self._trainer(NegatedGradients(), max_steps=steps, max_epochs=-1)
        call_trainer(trainer.fit, module, datamodule=datamodule)
        return self._result(job, module, self.setup.build_datamodule(job), trainer.global_step)

    def _sisa(self, job: ModelJob, entry: dict) -> TrainedModel:
        """A SISA shard model, trained slice by slice (resumed from the parent's checkpoint after slice ``resume_after``)."""
        slices = [np.asarray(part, dtype=np.int64) for part in entry["slices"]]
        resume_after = int(entry.get("resume_after", 0))
        if not 0 <= resume_after < len(slices):
            raise MiaError(f"unlearning.json: model {job.index} resumes after slice {resume_after} of {len(slices)}; it must retrain at least the last slice")

        def stage_job(stage: int) -> ModelJob:
            return ModelJob(job.index, np.concatenate(slices[:stage]), job.seed, job.parent)

        module = self.setup.build_model(self.setup.build_datamodule(stage_job(max(resume_after, 1))), job.seed)
        if resume_after:
            parent = self._parent(job)
            self._from_checkpoint(module, slice_checkpoint(self.experiment, parent, resume_after), parent)
            for stage in range(1, resume_after + 1):  # the untouched slices' states are the parent's: keep them for later versions
                inherited = load_model_checkpoint(slice_checkpoint(self.experiment, parent, stage), parent)
                save_model_checkpoint(inherited, slice_checkpoint(self.experiment, job.index, stage), job.index, self.experiment.root.name)
        steps = 0
        for stage in range(resume_after + 1, len(slices) + 1):
            datamodule = self.setup.build_datamodule(stage_job(stage))
            trainer = self._trainer()
            call_trainer(trainer.fit, module, datamodule=datamodule)
            steps += trainer.global_step
            module.continues_from_parent = True  # later stages keep the scaling fitted on slice 1
            if stage < len(slices):
                save_model_checkpoint(module, slice_checkpoint(self.experiment, job.index, stage), job.index, self.experiment.root.name)
        return self._result(job, module, datamodule, steps, first_slice=float(resume_after + 1))
