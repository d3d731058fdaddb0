"""DP-SGD for K linear heads trained at once on stacked weights: closed-form per-sample gradients, and per model its own clipping, noise, Poisson batches and accountant.

A linear head z = W^T x + b under cross-entropy has the per-sample gradients grad_W = x (p - e_y)^T and
grad_b = p - e_y (p = softmax(z)), so a sample's gradient norm over all of the head's parameters is
||p - e_y|| sqrt(||x||^2 + 1) and the sum of clipped gradients is one batched product
X^T diag(s) (P - Y): no per-sample gradient is ever stored. x comes dense [K, B, d] or in any form
that gives ||x||^2 and X^T (``HeadInputs``: the bag-of-words ensemble's sparse bags). Every model k
follows the rules of the ``DPSGD`` callback (``defences.dp_sgd``, Abadi et al., CCS 2016) with its own
instance of it, built from the recipe's ``trainer.callbacks``:

- Poisson sampling: model k's batches come from its own ``PoissonBatchSampler`` over its own training
  ids (rate q = batch_size / n_train, seeded by the model's data seed, as the sequential farm seeds it),
  so the vectorised and sequential farms draw the same batches; ``epochs x ceil(1/q)`` steps;
- clipping: each per-sample gradient to L2 norm ``max_grad_norm`` over W and b together (opacus'
  factor min(1, C / (norm + 1e-6)));
- noise: Gaussian of std ``noise_multiplier x max_grad_norm`` on the clipped sum, drawn from model k's
  own seeded generator; the sum is divided by the expected batch q n_train (opacus' ``mean`` reduction);
- accounting: model k's opacus accountant counts every step; the noise for a target epsilon comes
  from ``noise_for_budget``, and the budget stop of a given noise is found ahead (``allowed_steps``).

The privatised gradient is handed to the recipe's optimiser (post-processing, as opacus' DPOptimizer does).
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mia_lightning.defences.dp_sgd import DPSGD, PoissonBatchSampler
from mia_lightning.errors import MiaError

PAD = -1
"""Index of an empty slot in a padded batch [K, B] (models draw batches of different sizes)."""


class HeadInputs(Protocol):
    """Inputs x [K, B, d] of K linear heads in whatever form a family stores them (dense, or a sparse bag of words)."""

    def squared_norms(self) -> torch.Tensor:
        """||x||^2 per model and sample [K, B]."""

    def transposed_product(self, weighted: torch.Tensor) -> torch.Tensor:
        """X^T weighted [K, d, C] for weighted [K, B, C]."""


class DenseInputs:
    """``HeadInputs`` of a dense tensor x [K, B, d]."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def squared_norms(self) -> torch.Tensor:
        return (self.x * self.x).sum(-1)

    def transposed_product(self, weighted: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.x.transpose(1, 2), weighted)


def clipped_gradient_sums(x: torch.Tensor | HeadInputs, residual: torch.Tensor, valid: torch.Tensor, max_grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum over each model's batch of the clipped per-sample gradients of its linear head.

    ``x`` [K, B, d] inputs of the head (a tensor or any ``HeadInputs``), ``residual`` [K, B, C] softmax
    minus one-hot, ``valid`` bool [K, B] (padding is False), ``max_grad_norm`` [K]; returns grad_W
    [K, d, C], grad_b [K, 1, C] and the unclipped per-sample norms [K, B].
    """
    inputs = DenseInputs(x) if isinstance(x, torch.Tensor) else x
    norms = torch.linalg.vector_norm(residual, dim=-1) * torch.sqrt(inputs.squared_norms() + 1.0)
    scale = (max_grad_norm[:, None] / (norms + 1e-6)).clamp(max=1.0) * valid
    weighted = residual * scale.unsqueeze(-1)
    return inputs.transposed_product(weighted), weighted.sum(1, keepdim=True), norms


def noise_seed(seed: int) -> int:
    """The seed of a model's noise generator, derived from its farm seed (a stream apart from its initialisation and batches)."""
    return int(np.random.SeedSequence([seed, 0x4450]).generate_state(1)[0])


class PoissonIndexBatches(IterableDataset):
    """``steps`` padded batches [K, B] of pool ids, model k's from its own Poisson sampler (``PAD`` fills the slots past its batch)."""

    def __init__(self, samplers: list[PoissonBatchSampler], steps: int) -> None:
        self.samplers, self.steps = samplers, steps

    def _per_model(self, sampler: PoissonBatchSampler) -> Iterator[list[int]]:
        while True:
            yield from sampler

    def __iter__(self) -> Iterator[torch.Tensor]:
        streams = [self._per_model(sampler) for sampler in self.samplers]
        for _ in range(self.steps):
            chosen = [next(stream) for stream in streams]
            batch = torch.full((len(chosen), max(map(len, chosen))), PAD, dtype=torch.int64)
            for k, ids in enumerate(chosen):
                batch[k, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
            yield batch


class EnsemblePrivacy:
    """DP-SGD of K stacked linear heads: model k's planned ``DPSGD`` (noise, rate, delta, accountant), Poisson sampler and noise generator.

    ``callbacks`` must be planned already (``DPSGD.check_recipe``); all models of one ensemble take the
    same number of steps (the engine groups them by training-set size and batch size).
    """

    def __init__(self, callbacks: list[DPSGD], train_indices: list[np.ndarray], seeds: list[int], max_steps: int | None = None) -> None:
        steps = {callback.allowed_steps() for callback in callbacks}
        if len(steps) != 1:
            raise MiaError(f"DP-SGD ensemble: models of one group take {sorted(steps)} steps; group models by training-set size")
        self.callbacks = callbacks
        self.steps = min(steps.pop(), max_steps) if max_steps not in (None, -1) else steps.pop()
        self.samplers = [PoissonBatchSampler(ids, callback.sample_rate, seed=seed) for callback, ids, seed in zip(callbacks, train_indices, seeds)]
        self.seeds = [callback.seed if callback.seed is not None else noise_seed(seed) for callback, seed in zip(callbacks, seeds)]
        self.generators: list[torch.Generator] | None = None
        self.noise_std = torch.tensor([callback.sigma * callback.max_grad_norm for callback in callbacks], dtype=torch.float32)
        self.max_grad_norm = torch.tensor([callback.max_grad_norm for callback in callbacks], dtype=torch.float32)
        self.expected_batch = torch.tensor([float(callback.expected_batch) for callback in callbacks], dtype=torch.float32)

    def batches(self) -> PoissonIndexBatches:
        """The training batches: ``steps`` padded [K, B] tensors of pool ids."""
        return PoissonIndexBatches(self.samplers, self.steps)

    def _noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Standard normal [K, *shape], model k's slice from model k's own generator."""
        if self.generators is None or self.generators[0].device != device:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in self.seeds]
        return torch.stack([torch.randn(shape, generator=generator, device=device) for generator in self.generators])

    def privatise(self, x: torch.Tensor | HeadInputs, residual: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DP-SGD gradients (grad_W [K, d, C], grad_b [K, 1, C]): clipped sums plus each model's noise, over its expected batch."""
        device = residual.device
        grad_w, grad_b, _ = clipped_gradient_sums(x, residual, valid, self.max_grad_norm.to(device))
        std, expected = self.noise_std.to(device), self.expected_batch.to(device)
        if bool((std > 0).any()):
            grad_w = grad_w + std[:, None, None] * self._noise(tuple(grad_w.shape[1:]), device)
            grad_b = grad_b + std[:, None, None] * self._noise(tuple(grad_b.shape[1:]), device)
        return grad_w / expected[:, None, None], grad_b / expected[:, None, None]

    def count_step(self) -> None:
        """One step on every model's accountant."""
        for callback in self.callbacks:
            callback.accountant.step(noise_multiplier=callback.sigma, sample_rate=callback.sample_rate)

    def states(self) -> list[dict[str, Any]]:
        """Each model's DP state (epsilon spent, delta, noise, rate, steps, accountant), as the ``DPSGD`` callback records it."""
        return [callback.state() for callback in self.callbacks]

