"""K linear heads trained at once with DP-SGD (``defences.dp_ensemble``): the vectorised farm's engine for a recipe with the ``DPSGD`` callback.

Manual optimisation: each step computes the closed-form clipped per-sample gradient sums of every
head on its own Poisson batch, adds each model's noise, hands the result to the recipe's optimiser
(one elementwise optimiser over the stacked parameters is K optimisers) and counts the step on every
model's accountant. ``PrivateHeadSteps`` is that step for any ensemble of linear heads (tabular heads
here, the bag-of-words classifier in ``models.bag_ensemble``); the tabular heads' feature scaling
comes from the whole pool (never from a model's training subset).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mia_lightning.defences.dp_ensemble import PAD, EnsemblePrivacy
from mia_lightning.errors import MiaError
from mia_lightning.models.ensemble import VectorisedMLP
from mia_lightning.models.tabular_mlp import TabularMLP


class PrivateHeadSteps:
    """LightningModule mixin: ``training_step`` is one DP-SGD step of K stacked linear heads z = x W[k] + b[k]; a batch is padded pool ids [K, B].

    The ensemble calls ``private_init`` in its constructor and provides ``pool_labels``, ``n_models``,
    ``head_inputs(ids)`` (the heads' inputs of pool ids [K, B], a tensor or ``HeadInputs``, and their
    logits [K, B, C]), ``head_parameters()`` (W [K, d, C], b [K, 1, C]) and an ``unstack`` that this
    mixin extends with each model's DP state.
    """

    privacy: EnsemblePrivacy

    def private_init(self, privacy: EnsemblePrivacy) -> None:
        self.privacy = privacy
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One DP-SGD step of every head; logs the mean cross-entropy over each model's Poisson batch."""
        valid = batch != PAD
        ids = batch.clamp(min=0)
        with torch.no_grad():
            inputs, logits = self.head_inputs(ids)
            labels = self.pool_labels[ids]
            residual = torch.softmax(logits.float(), dim=-1) - F.one_hot(labels, logits.shape[-1]).float()
            grad_w, grad_b = self.privacy.privatise(inputs, residual, valid)
            loss = (F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(batch.shape) * valid).sum(1)
            loss = (loss / valid.sum(1).clamp(min=1)).sum()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        weight, bias = self.head_parameters()
        weight.grad, bias.grad = grad_w.to(weight.dtype), grad_b.to(bias.dtype)
        optimizer.step()
        self.privacy.count_step()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def unstack(self) -> list[L.LightningModule]:
        """The K models, each carrying its DP state (checkpointed by ``PrivacyStateMixin``)."""
        models = super().unstack()
        for model, state in zip(models, self.privacy.states()):
            model.dp_state = state
        return models


class DPHeadEnsemble(PrivateHeadSteps, VectorisedMLP):
    """``VectorisedMLP`` of linear heads (``hidden: []``, temperature 1) whose training steps are DP-SGD steps; a batch is padded pool ids [K, B]."""

    def __init__(self, models: list[TabularMLP], pool_features: torch.Tensor, pool_labels: torch.Tensor, pool_views: torch.Tensor | None,
                 privacy: EnsemblePrivacy) -> None:
        super().__init__(models, pool_features, pool_labels, pool_views)
        if len(self.weights) != 1 or self.temperature != 1.0:
            raise MiaError("DP-SGD on the vectorised farm trains linear heads (model.init_args.hidden: [], temperature 1); use farm.engine: sequential")
        self.private_init(privacy)

    def head_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool-standardised features [K, B, d] of ids and the heads' logits."""
        x = self._standardised_batch(ids)
        return x, torch.baddbmm(self.biases[0], x, self.weights[0])

    def head_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.weights[0], self.biases[0]
