"""Seeded minibatch index streams shared by the sequential and the vectorised farms.

A model's epoch is ``ceil(len(train) / batch_size)`` batches of exactly ``batch_size`` indices
cut from an endless sequence of seeded permutations of its training subset. Both farms draw the
same stream for the same seed, so for the same seeds they make the same updates. Under DP-SGD a
DataModule's batches are Poisson samples instead (``MembershipBatches``, the one place that chooses).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from mia_lightning.defences.dp_sgd import PoissonBatchSampler
from mia_lightning.errors import MiaError


def balanced_half(n: int, seed: int) -> np.ndarray:
    """A seeded random half of ``range(n)`` (sorted), for stand-alone single-model training."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2])


def check_batch_size(batch_size: object, option: str = "data.init_args.batch_size") -> None:
    """Refuse a batch size that is not a positive integer, naming the option that set it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MiaError(f"{option} {batch_size!r}: must be a positive integer (samples per training step)")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Batches per epoch for a training subset of ``n_train`` samples."""
    return max(1, math.ceil(n_train / batch_size))


def index_stream(train_indices: np.ndarray, batch_size: int, n_steps: int, seed: int) -> torch.Tensor:
    """int64 [n_steps, batch_size] pool ids: consecutive seeded permutations of ``train_indices``, cut into batches."""
    ids = torch.as_tensor(np.asarray(train_indices), dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    needed = n_steps * batch_size
    chunks, total = [], 0
    while total < needed:
        chunks.append(ids[torch.randperm(ids.numel(), generator=generator)])
        total += ids.numel()
    return torch.cat(chunks)[:needed].view(n_steps, batch_size)


class StreamBatchSampler(Sampler[list[int]]):
    """Batch sampler over ``index_stream``: epoch e yields the e-th slice of the same endless stream.

    Under DDP (``world_size > 1``) rank r takes every world_size-th index of each batch, so the
    ranks together see exactly the single-process batches (run with ``use_distributed_sampler: false``).
    """

    def __init__(self, train_indices: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        check_batch_size(batch_size)
        self.train_indices = np.asarray(train_indices)
        self.batch_size = min(batch_size, len(self.train_indices))
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return steps_per_epoch(len(self.train_indices), self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        steps = len(self)
        stream = index_stream(self.train_indices, self.batch_size, steps * (self.epoch + 1), self.seed)
        self.epoch += 1
        yield from stream[-steps:, self.rank :: self.world_size].tolist()


class MembershipBatches:
    """Mixin of a DataModule with ``train_indices``: its training batch sampler is the seeded minibatch stream, or Poisson batches once DP-SGD asked for them."""

    poisson_sample_rate: float | None = None
    """Set by ``enable_poisson_sampling`` (DP-SGD); None: the seeded minibatch stream."""

    def enable_poisson_sampling(self, batch_size: int) -> float:
        """For DP-SGD (``mia_lightning.defences.dp_sgd.DPSGD``): training batches become Poisson samples of expected size ``batch_size``; returns the rate."""
        self.poisson_sample_rate = min(1.0, batch_size / self.train_indices.size)
        return self.poisson_sample_rate

    def train_batch_sampler(self) -> Sampler[list[int]]:
        """The Poisson sampler under DP-SGD, else this rank's share of the seeded stream of ``batch_size`` minibatches."""
        if self.poisson_sample_rate is not None:
            return PoissonBatchSampler(self.train_indices, self.poisson_sample_rate, seed=self.hparams.seed)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return StreamBatchSampler(self.train_indices, self.hparams.batch_size, seed=self.hparams.seed, rank=rank, world_size=world)
