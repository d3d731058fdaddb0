"""The vectorised farm engine: groups of up to ``group_size`` tabular MLPs trained by one Lightning run.

Each model keeps its own seed, initialisation (built exactly as the sequential engine builds it),
feature scaling and minibatch stream (``data.streams.index_stream``: the concatenation of the epoch
slices ``StreamBatchSampler`` yields the sequential farm), so for the same seeds the vectorised and
sequential farms make the same updates. Models in one group must take the same number of steps with
the same batch size, so jobs are grouped by (batch size, steps) first; a plan of random halves gives
one or two groups.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mia_lightning.data.streams import StreamBatchSampler, index_stream, steps_per_epoch
from mia_lightning.data.tabular import TabularDataModule
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.engine import FarmSetup, ModelJob, TrainedModel, fit
from mia_lightning.farm.progress import GroupProgress
from mia_lightning.models.ensemble import VectorisedMLP
from mia_lightning.models.tabular_mlp import TabularMLP

PREDICT_ELEMENTS = 2**25
"""Bound on K x batch x width activations per predict batch (128 MiB in float32), so wide pools of many heads fit."""


def _accuracy(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    return float((logits[ids, 0].argmax(-1) == labels[ids]).mean()) if ids.size else float("nan")


class VectorisedEngine:
    """Trains tabular MLPs (or linear heads, ``hidden: []``) ``group_size`` at a time."""

    trains_groups = True
    """The runner hands it ``farm.group_size`` jobs at a time."""

    def __init__(
        self,
        setup: FarmSetup,
        group_size: int = 64,
        progress: Callable[[], list[L.Callback]] | None = None,
        experiment: ExperimentDir | None = None,
    ) -> None:
        if not issubclass(setup.model.resolve(), TabularMLP) or not issubclass(setup.data.resolve(), TabularDataModule):
            raise MiaError(
                f"the vectorised engine supports the tabular MLP and linear heads (hidden: []) on tabular data; "
                f"{setup.model.class_path} on {setup.data.class_path} needs farm.engine: sequential"
            )
        if group_size < 1:
            raise MiaError(f"--farm.group_size {group_size}: must be at least 1")
        if setup.callbacks:
            raise MiaError("trainer.callbacks act on one Lightning run per model; use farm.engine: sequential with them")
        self.setup = setup
        self.group_size = group_size
        self.progress = progress

    def _total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of one sequential ``Trainer.fit`` (Lightning's rules: the first of max_steps and max_epochs, 1000 epochs if neither)."""
        max_steps, max_epochs = self.setup.trainer.get("max_steps", -1), self.setup.trainer.get("max_epochs")
        limits = [] if max_steps in (None, -1) else [int(max_steps)]
        if max_epochs is None and not limits:
            max_epochs = 1000
        if max_epochs not in (None, -1):
            limits.append(int(max_epochs) * steps_per_epoch)
        if not limits:
            raise MiaError("trainer.max_epochs: -1 without trainer.max_steps never stops; set one of them")
        return min(limits)

    def run(self, jobs: list[ModelJob]) -> Iterator[TrainedModel]:
        groups: dict[tuple[int, int], list[tuple[ModelJob, TabularDataModule]]] = defaultdict(list)
        for job in jobs:
            if job.parent is not None:
                raise MiaError(f"model {job.index} continues from model {job.parent}; derived models need farm.engine: sequential")
            datamodule = self.setup.build_datamodule(job)
            sampler = StreamBatchSampler(job.train_indices, datamodule.hparams.batch_size, seed=job.seed)
            groups[(sampler.batch_size, self._total_steps(len(sampler)))].append((job, datamodule))
        for (batch_size, steps), members in groups.items():
            for start in range(0, len(members), self.group_size):
                yield from self._train_group(members[start : start + self.group_size], batch_size, steps)

    def _train_group(self, members: list[tuple[ModelJob, TabularDataModule]], batch_size: int, steps: int) -> Iterator[TrainedModel]:
        models = []
        for job, datamodule in members:
            model = self.setup.build_model(datamodule, job.seed)
            model.fit_standardizer(*datamodule.train_feature_stats())
            models.append(model)
        pool = members[0][1].pool
        views = getattr(members[0][1], "pool_views", None)  # features of several query views (image DataModules)
        ensemble = VectorisedMLP(models, torch.from_numpy(pool.features), torch.from_numpy(pool.labels), None if views is None else torch.from_numpy(views))
        streams = torch.stack([index_stream(job.train_indices, batch_size, steps, job.seed) for job, _ in members], dim=1)
        epoch_steps = steps_per_epoch(members[0][0].train_indices.size, batch_size)
        callbacks = [GroupProgress([job.index for job, _ in members], epoch_steps, steps)] if self.progress else []
        trainer = self.setup.build_trainer(max_epochs=1, max_steps=-1, callbacks=callbacks, enable_progress_bar=False, limit_val_batches=0)
        fit(trainer, ensemble, train_dataloaders=DataLoader(streams, batch_size=None, shuffle=False))
        widest = max(pool.n_features, *(w.shape[-1] for w in ensemble.weights))
        predict_batch = max(1, PREDICT_ELEMENTS // (len(members) * widest * (1 if views is None else views.shape[1])))
        predictor = self.setup.build_trainer(devices=1, enable_progress_bar=False)
        batches = predictor.predict(ensemble, DataLoader(torch.arange(len(pool.labels)), batch_size=predict_batch))
        logits = torch.cat([b.cpu() for b in batches], dim=1).numpy()
        everyone = np.arange(len(pool.labels))
        for k, ((job, _), model) in enumerate(zip(members, ensemble.unstack())):
            held_out = np.setdiff1d(everyone, job.train_indices)
            metrics = {"train_acc": _accuracy(logits[k], pool.labels, job.train_indices), "val_acc": _accuracy(logits[k], pool.labels, held_out)}
            yield TrainedModel(job.index, model, logits[k], metrics)
