"""The vectorised farm engine: groups of up to ``group_size`` tabular MLPs trained by one Lightning run.

Each model keeps its own seed, initialisation (built exactly as the sequential engine builds it),
feature scaling and minibatch stream (``data.streams.index_stream``), so for the same seeds the
vectorised and sequential farms make the same updates. Models in one group must take the same
number of steps with the same batch size, so jobs are grouped by (batch size, steps) first.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mia_lightning.data.streams import index_stream, steps_per_epoch
from mia_lightning.errors import MiaError
from mia_lightning.farm.engine import FarmSetup, ModelJob, TrainedModel
from mia_lightning.models.ensemble import VectorisedMLP
from mia_lightning.models.tabular_mlp import TabularMLP


def _accuracy(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    return float((logits[ids, 0].argmax(-1) == labels[ids]).mean()) if ids.size else float("nan")


class VectorisedEngine:
    """Trains tabular MLPs (or linear heads, ``hidden: []``) ``group_size`` at a time."""

    def __init__(self, setup: FarmSetup, group_size: int = 64, progress: Callable[[], list[L.Callback]] | None = None) -> None:
        model_cls = setup.model.resolve()
        if not issubclass(model_cls, TabularMLP):
            raise MiaError(
                f"farm.engine vectorised trains the tabular MLP and linear heads (hidden: []); "
                f"{setup.model.class_path} needs farm.engine: sequential"
            )
        if group_size < 1:
            raise MiaError(f"farm.group_size={group_size}: must be at least 1")
        self.setup = setup
        self.group_size = group_size
        self.progress = progress

    def _total_steps(self, n_train: int, batch_size: int) -> int:
        trainer = self.setup.trainer
        if trainer.get("max_steps", -1) not in (-1, None):
            return int(trainer["max_steps"])
        return int(trainer.get("max_epochs") or 1000) * steps_per_epoch(n_train, batch_size)

    def run(self, jobs: list[ModelJob]) -> Iterator[TrainedModel]:
        groups: dict[tuple[int, int], list[ModelJob]] = defaultdict(list)
        batch_size = int(self.setup.data.init_args.get("batch_size", 64))
        for job in jobs:
            size = min(batch_size, job.train_indices.size) if batch_size > 0 else job.train_indices.size
            groups[(size, self._total_steps(job.train_indices.size, size))].append(job)
        for (size, steps), members in groups.items():
            for start in range(0, len(members), self.group_size):
                yield from self._train_group(members[start : start + self.group_size], size, steps)

    def _train_group(self, jobs: list[ModelJob], batch_size: int, steps: int) -> Iterator[TrainedModel]:
        datamodules = [self.setup.build_datamodule(job) for job in jobs]
        models = []
        for job, datamodule in zip(jobs, datamodules):
            model = self.setup.build_model(datamodule, job.seed)
            model.fit_standardizer(*datamodule.train_feature_stats())
            models.append(model)
        pool = datamodules[0].pool
        ensemble = VectorisedMLP(models, torch.from_numpy(pool.features), torch.from_numpy(pool.labels))
        streams = torch.stack([index_stream(job.train_indices, batch_size, steps, job.seed) for job in jobs], dim=1)
        callbacks = self.progress() if self.progress else []
        trainer = self.setup.build_trainer(
            max_epochs=1, max_steps=-1, callbacks=callbacks, enable_progress_bar=bool(callbacks), limit_val_batches=0
        )
        trainer.fit(ensemble, train_dataloaders=DataLoader(streams, batch_size=None, shuffle=False))
        predictor = self.setup.build_trainer(devices=1, enable_progress_bar=False)
        pool_ids = torch.arange(len(pool.labels))
        batches = predictor.predict(ensemble, DataLoader(pool_ids, batch_size=4096))
        logits = torch.cat([b.cpu() for b in batches], dim=1).numpy()
        everyone = np.arange(len(pool.labels))
        for k, (job, model) in enumerate(zip(jobs, ensemble.unstack())):
            held_out = np.setdiff1d(everyone, job.train_indices)
            metrics = {"train_acc": _accuracy(logits[k], pool.labels, job.train_indices), "val_acc": _accuracy(logits[k], pool.labels, held_out)}
            yield TrainedModel(job.index, model, logits[k], metrics)
