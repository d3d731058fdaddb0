"""The vectorised farm engine: groups of up to ``group_size`` models trained by one Lightning run.

Families that stack (``FAMILIES``): tabular MLPs and linear heads on tabular or cached features
(``models.ensemble.VectorisedMLP``), bag-of-words text classifiers (``models.bag_ensemble.VectorisedBag``),
LSTM text classifiers (``models.lstm_ensemble.VectorisedLSTM``) and timm image classifiers fine-tuned
on pixels (``models.image_ensemble.VectorisedImageClassifier``).
Each model keeps its own seed, initialisation (built exactly as the sequential engine builds it),
feature scaling and minibatch stream (``data.streams.index_stream``: the concatenation of the epoch
slices ``StreamBatchSampler`` yields the sequential farm), so for the same seeds the vectorised and
sequential farms make the same updates. Models in one group must take the same number of steps with
the same batch size, so jobs are grouped by (batch size, steps) first; a plan of random halves gives
one or two groups. ``group_size`` bounds memory: activations grow linearly with it.

DP-SGD: a recipe whose ``trainer.callbacks`` is the ``DPSGD`` callback trains linear heads
(``hidden: []``, ``models.dp_heads.DPHeadEnsemble``) and linear bag-of-words classifiers
(``embedding_dim: 0``, ``models.bag_ensemble.DPBagEnsemble``) here too (closed-form per-sample
gradients, each model its own Poisson batches, noise and accountant), grouped by training-set size so
each group shares one sample rate and step count; other families with DP-SGD train on the sequential engine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mia_lightning.data.images import ImageDataModule, query_views
from mia_lightning.data.streams import StreamBatchSampler, index_stream, steps_per_epoch
from mia_lightning.data.tabular import TabularDataModule
from mia_lightning.data.text import TextDataModule
from mia_lightning.defences.dp_ensemble import EnsemblePrivacy
from mia_lightning.defences.dp_sgd import DPSGD, state_metrics
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.engine import FarmSetup, ModelJob, TrainedModel
from mia_lightning.farm.progress import GroupProgress
from mia_lightning.interrupts import call_trainer
from mia_lightning.models.bag import BagOfWordsClassifier
from mia_lightning.models.bag_ensemble import DPBagEnsemble, VectorisedBag
from mia_lightning.models.dp_heads import DPHeadEnsemble
from mia_lightning.models.ensemble import VectorisedMLP
from mia_lightning.models.image import ImageClassifier
from mia_lightning.models.image_ensemble import VectorisedImageClassifier, largest_activation
from mia_lightning.models.lstm import LSTMClassifier
from mia_lightning.models.lstm_ensemble import VectorisedLSTM, stackable, unstackable_args
from mia_lightning.models.tabular_mlp import TabularMLP

PREDICT_ELEMENTS = 2**25
"""Bound on K x batch x width activations per predict batch (128 MiB in float32), so wide pools of many heads fit."""


def _accuracy(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    return float((logits[ids, 0].argmax(-1) == labels[ids]).mean()) if ids.size else float("nan")


def _mlp_ensemble(models: list[TabularMLP], datamodule: TabularDataModule, privacy: EnsemblePrivacy | None = None) -> tuple[VectorisedMLP, int]:
    """The MLP ensemble on the pool's features (and query views, image DataModules), DP-SGD heads with ``privacy``; activations per predicted sample and model."""
    pool = datamodule.pool
    views = getattr(datamodule, "pool_views", None)
    tensors = (torch.from_numpy(pool.features), torch.from_numpy(pool.labels), None if views is None else torch.from_numpy(views))
    ensemble = VectorisedMLP(models, *tensors) if privacy is None else DPHeadEnsemble(models, *tensors, privacy=privacy)
    widest = max(pool.n_features, *(w.shape[-1] for w in ensemble.weights))
    return ensemble, widest * (1 if views is None else views.shape[1])


def _bag_ensemble(models: list[BagOfWordsClassifier], datamodule: TextDataModule, privacy: EnsemblePrivacy | None = None) -> tuple[VectorisedBag, int]:
    """The bag-of-words ensemble on the pool's token ids, DP-SGD linear classifiers with ``privacy``.

    Activations per predicted sample and model: its packed bag (offset ids and weights, 3 floats' worth
    per word), the summed embedding and the logits.
    """
    tensors = (torch.from_numpy(datamodule.tokens), torch.from_numpy(datamodule.pool_labels()))
    ensemble = VectorisedBag(models, *tensors) if privacy is None else DPBagEnsemble(models, *tensors, privacy=privacy)
    return ensemble, 3 * ensemble.pool_ids.shape[1] + ensemble.hparams.embedding_dim + 2 * ensemble.hparams.n_classes


def _lstm_ensemble(models: list[LSTMClassifier], datamodule: TextDataModule) -> tuple[VectorisedLSTM, int]:
    """The LSTM ensemble on the pool's token ids; activations per predicted sample and model (T steps x 4H gates, every layer and direction)."""
    reason = stackable(models)
    if reason:
        raise MiaError(f"the vectorised engine cannot stack these LSTMs: {reason}; use farm.engine: sequential")
    ensemble = VectorisedLSTM(models, torch.from_numpy(datamodule.tokens), torch.from_numpy(datamodule.pool_labels()))
    hp = ensemble.hparams
    return ensemble, datamodule.tokens.shape[1] * 5 * hp.hidden_size * hp.num_layers * (2 if hp.bidirectional else 1)


def _image_ensemble(models: list[ImageClassifier], datamodule: ImageDataModule) -> tuple[VectorisedImageClassifier, int]:
    """The image-classifier ensemble on the pool's pixels; activations per predicted sample and model (every query view at the largest layer output)."""
    spec = datamodule.spec
    pool = datamodule.pool
    ensemble = VectorisedImageClassifier(models, torch.from_numpy(pool.images), torch.from_numpy(pool.labels), spec.preprocess(),
                                         partial(query_views, queries=spec.parsed_queries))
    one = spec.preprocess()(torch.from_numpy(pool.images[:1]))
    return ensemble, len(spec.parsed_queries) * largest_activation(models[0], one)


@dataclass(frozen=True)
class Family:
    """A model family the engine stacks: its model and data classes, how a group becomes one ensemble module, and where that pays.

    ``faster_on`` lists the device types on which the ensemble beats the sequential farm in models/min
    (``farm.engine: auto`` trains the family vectorised there only); ``cpu_threads`` is the torch thread
    count a farm process of the family trains with on the CPU when ``farm.threads`` is not set (None:
    torch's default, every usable core); ``prepare`` fits state on each
    model's training subset before training (under DP-SGD, ``private``, on data that does not depend on it); ``refuses`` says why a recipe's model
    arguments cannot stack (None when they can); ``private`` says why they cannot train with DP-SGD here.
    """

    model: type
    data: type
    stack: Callable[..., tuple[L.LightningModule, int]]
    faster_on: frozenset[str]
    cpu_threads: int | None = None
    prepare: Callable[[L.LightningModule, L.LightningDataModule, bool], None] = lambda model, datamodule, private: None
    refuses: Callable[[Mapping[str, Any]], str | None] = lambda args: None
    private: Callable[[Mapping[str, Any]], str | None] = lambda args: "its ensemble has no DP-SGD"


def _dp_head_refusal(args: Mapping[str, Any]) -> str | None:
    """Why DP-SGD cannot train these MLP arguments vectorised (closed-form per-sample gradients exist for one linear layer at temperature 1)."""
    if list(args.get("hidden", [128])) or float(args.get("temperature", 1.0)) != 1.0:
        return "DP-SGD on the vectorised engine trains linear heads only (model.init_args.hidden: [], temperature 1)"
    return None


def _dp_bag_refusal(args: Mapping[str, Any]) -> str | None:
    """Why DP-SGD cannot train these bag-of-words arguments vectorised (closed-form per-sample gradients exist for the linear classifier)."""
    if int(args.get("embedding_dim", 0)):
        return "DP-SGD on the vectorised engine trains the linear bag-of-words classifier only (model.init_args.embedding_dim: 0)"
    return None


FAMILIES = (
    Family(TabularMLP, TabularDataModule, _mlp_ensemble, frozenset({"cpu", "cuda"}),
           prepare=lambda model, datamodule, private: model.fit_standardizer(*(datamodule.pool_feature_stats() if private else datamodule.train_feature_stats())),
           private=_dp_head_refusal),
    # Before the LSTM family (both read TextDataModule); faster on the CPU: see benchmarks/farm_throughput.py case 6 (docs/text.md).
    Family(BagOfWordsClassifier, TextDataModule, _bag_ensemble, frozenset({"cpu"}), private=_dp_bag_refusal),
    # On the CPU nn.LSTM's fused oneDNN kernel already trains one model at about the matmul peak (README, Farm). Its steps are
    # thousands of small kernels: with idle OpenMP threads asleep (runtime.py) two threads train 1.25-1.6x slower than one, idle
    # or beside busy processes; spinning they are faster only on an idle machine (benchmarks/farm_threads.py, README Farm).
    Family(LSTMClassifier, TextDataModule, _lstm_ensemble, frozenset({"cuda"}), cpu_threads=1, refuses=unstackable_args),
    # On the CPU one model's step at the few-shot batch already runs its layers near their best per-sample cost: the ensemble
    # trains fmnist_film at 0.98x (FiLM) / 0.72x (full) of the sequential farm (docs/images.md, README Farm; stacking_bound.py).
    Family(ImageClassifier, ImageDataModule, _image_ensemble, frozenset({"cuda"})),
)
"""Families in lookup order: the first whose model and data classes the recipe's classes derive from."""


def device_type(trainer: Mapping[str, Any]) -> str:
    """The device type a recipe's trainer runs on: ``cuda`` for ``gpu`` / ``cuda``, the CUDA device when ``auto`` (or unset) finds one, else the accelerator's name."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator == "auto" else accelerator


def choose_engine(setup: FarmSetup, derived_models: bool = False) -> tuple[str, str]:
    """``farm.engine: auto``: ``vectorised`` when the recipe's family stacks and its ensemble is the faster engine on the recipe's device, else ``sequential``; with the reason."""
    if derived_models:
        return "sequential", "the plan derives models from others (parents), which only the sequential engine trains"
    if setup.callbacks and not _only_dp_sgd(setup):
        return "sequential", "trainer.callbacks act on one Lightning run per model"
    try:
        family = family_of(setup)
    except MiaError:
        return "sequential", f"{setup.model.class_path} on {setup.data.class_path} has no vectorised ensemble"
    reason = family.refuses(setup.model.init_args) or (family.private(setup.model.init_args) if setup.callbacks else None)
    if reason:
        return "sequential", reason
    device = device_type(setup.trainer)
    if device not in family.faster_on:
        return "sequential", f"the {family.model.__name__} ensemble is slower than the sequential farm on {device} (README, Farm)"
    return "vectorised", f"the {family.model.__name__} ensemble is the faster engine on {device}"


def farm_threads(setup: FarmSetup, threads: int | None) -> tuple[int | None, str | None]:
    """Torch threads a farm process trains with and why: ``farm.threads`` when set, else the family's ``cpu_threads`` on the CPU, else None (torch's default)."""
    if threads is not None:
        return threads, "farm.threads"
    if device_type(setup.trainer) != "cpu":
        return None, None
    try:
        family = family_of(setup)
    except MiaError:
        return None, None
    if family.cpu_threads is None:
        return None, None
    return family.cpu_threads, f"the {family.model.__name__} family's measured best on cpu"


def _only_dp_sgd(setup: FarmSetup) -> bool:
    """Whether the recipe's only callback is the ``DPSGD`` callback (the one the vectorised engine applies itself)."""
    return len(setup.callbacks) == 1 and issubclass(setup.callbacks[0].resolve(), DPSGD)


def family_of(setup: FarmSetup) -> Family:
    """The stacking family of the recipe's model and data, or a one-line error naming what is supported."""
    model, data = setup.model.resolve(), setup.data.resolve()
    for family in FAMILIES:
        if issubclass(model, family.model) and issubclass(data, family.data):
            return family
    supported = "; ".join(f"{f.model.__name__} on {f.data.__name__}" for f in FAMILIES)
    raise MiaError(f"the vectorised engine stacks {supported} (tabular MLPs include linear heads, hidden: []); "
                   f"{setup.model.class_path} on {setup.data.class_path} needs farm.engine: sequential")


class VectorisedEngine:
    """Trains the models of a stacking family (``FAMILIES``) ``group_size`` at a time."""

    trains_groups = True
    """The runner hands it ``farm.group_size`` jobs at a time."""

    def __init__(
        self,
        setup: FarmSetup,
        group_size: int = 64,
        progress: Callable[[], list[L.Callback]] | None = None,
        experiment: ExperimentDir | None = None,
    ) -> None:
        self.family = family_of(setup)
        if group_size < 1:
            raise MiaError(f"--farm.group_size {group_size}: must be at least 1")
        self.private = bool(setup.callbacks)
        if self.private and not _only_dp_sgd(setup):
            raise MiaError("trainer.callbacks act on one Lightning run per model; use farm.engine: sequential with them (the DPSGD callback alone trains vectorised)")
        reason = self.family.private(setup.model.init_args) if self.private else None
        if reason:
            raise MiaError(f"{reason}; use farm.engine: sequential")
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
        return min(limits)  # never empty: FarmSetup refuses max_epochs -1 without max_steps

    def run(self, jobs: list[ModelJob]) -> Iterator[TrainedModel]:
        groups: dict[tuple[int, int, int], list[tuple[ModelJob, L.LightningDataModule]]] = defaultdict(list)
        for job in jobs:
            if job.parent is not None:
                raise MiaError(f"model {job.index} continues from model {job.parent}; derived models need farm.engine: sequential")
            datamodule = self.setup.build_datamodule(job)
            sampler = StreamBatchSampler(datamodule.train_indices, datamodule.hparams.batch_size, seed=job.seed)
            groups[(int(datamodule.train_indices.size) if self.private else 0, sampler.batch_size, self._total_steps(len(sampler)))].append((job, datamodule))
        for (_, batch_size, steps), members in groups.items():
            for start in range(0, len(members), self.group_size):
                yield from self._train_group(members[start : start + self.group_size], batch_size, steps)

    def _privacy(self, members: list[tuple[ModelJob, L.LightningDataModule]], models: list[L.LightningModule]) -> EnsemblePrivacy:
        """Each model's own ``DPSGD`` from the recipe, planned on its training subset (noise, rate, delta, accountant), with its Poisson sampler and noise generator."""
        callbacks = []
        for (job, datamodule), model in zip(members, models):
            callback = self.setup.build_callbacks()[0]
            callback.check_recipe(datamodule, model, self.setup.trainer.get("max_epochs"))
            callbacks.append(callback)
        return EnsemblePrivacy(callbacks, [datamodule.train_indices for _, datamodule in members], [job.seed for job, _ in members],
                               max_steps=self.setup.trainer.get("max_steps"))

    def _train_group(self, members: list[tuple[ModelJob, L.LightningDataModule]], batch_size: int, steps: int) -> Iterator[TrainedModel]:
        models = []
        for job, datamodule in members:
            model = self.setup.build_model(datamodule, job.seed)
            self.family.prepare(model, datamodule, self.private)  # under DP-SGD never from the training subset: it would leak outside the guarantee
            models.append(model)
        first = members[0][1]
        if self.private:
            privacy = self._privacy(members, models)
            ensemble, width = self.family.stack(models, first, privacy)
            batches, steps = privacy.batches(), privacy.steps
            epoch_steps = math.ceil(1.0 / privacy.callbacks[0].sample_rate)
        else:
            ensemble, width = self.family.stack(models, first)
            batches = torch.stack([index_stream(datamodule.train_indices, batch_size, steps, job.seed) for job, datamodule in members], dim=1)
            epoch_steps = steps_per_epoch(first.train_indices.size, batch_size)
        callbacks = [GroupProgress([job.index for job, _ in members], epoch_steps, steps)] if self.progress else []
        trainer = self.setup.build_trainer(max_epochs=1, max_steps=-1, callbacks=callbacks, enable_progress_bar=False, limit_val_batches=0)
        call_trainer(trainer.fit, ensemble, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
        labels = first.pool_labels()
        predict_batch = max(1, PREDICT_ELEMENTS // (len(members) * width))
        predictor = self.setup.build_trainer(devices=1, enable_progress_bar=False)
        batches = call_trainer(predictor.predict, ensemble, DataLoader(torch.arange(len(labels)), batch_size=predict_batch))
        logits = torch.cat([b.cpu() for b in batches], dim=1).numpy()
        everyone = np.arange(len(labels))
        for k, ((job, datamodule), model) in enumerate(zip(members, ensemble.unstack())):
            held_out = np.setdiff1d(everyone, job.train_indices)
            metrics = {"train_acc": _accuracy(logits[k], labels, datamodule.train_indices), "val_acc": _accuracy(logits[k], labels, held_out)}
            if getattr(model, "dp_state", None) is not None:
                metrics |= state_metrics(model.dp_state)
            yield TrainedModel(job.index, model, logits[k], metrics)
