"""K linear heads trained at once with DP-SGD (``defences.dp_ensemble``): the vectorised farm's engine for a recipe with the ``DPSGD`` callback.

Manual optimisation: each step computes the closed-form clipped per-sample gradient sums of every
head on its own Poisson batch, adds each model's noise, hands the result to the recipe's optimiser
(one elementwise optimiser over the stacked parameters is K optimisers) and counts the step on every
model's accountant. The feature scaling comes from the whole pool (never from a model's training subset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mia_lightning.defences.dp_ensemble import PAD, EnsemblePrivacy
from mia_lightning.errors import MiaError
from mia_lightning.models.ensemble import VectorisedMLP
from mia_lightning.models.tabular_mlp import TabularMLP


class DPHeadEnsemble(VectorisedMLP):
    """``VectorisedMLP`` of linear heads (``hidden: []``, temperature 1) whose training steps are DP-SGD steps; a batch is padded pool ids [K, B]."""

    def __init__(self, models: list[TabularMLP], pool_features: torch.Tensor, pool_labels: torch.Tensor, pool_views: torch.Tensor | None,
                 privacy: EnsemblePrivacy) -> None:
        super().__init__(models, pool_features, pool_labels, pool_views)
        if len(self.weights) != 1 or self.temperature != 1.0:
            raise MiaError("DP-SGD on the vectorised farm trains linear heads (model.init_args.hidden: [], temperature 1); use farm.engine: sequential")
        self.privacy = privacy
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One DP-SGD step of every head; logs the mean cross-entropy over each model's Poisson batch."""
        valid = batch != PAD
        ids = batch.clamp(min=0)
        x = self._standardised_batch(ids)
        with torch.no_grad():
            logits = torch.baddbmm(self.biases[0], x, self.weights[0])
            labels = self.pool_labels[ids]
            residual = torch.softmax(logits.float(), dim=-1) - F.one_hot(labels, logits.shape[-1]).float()
            grad_w, grad_b = self.privacy.privatise(x, residual, valid)
            loss = (F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(batch.shape) * valid).sum(1)
            loss = (loss / valid.sum(1).clamp(min=1)).sum()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.weights[0].grad, self.biases[0].grad = grad_w.to(self.weights[0].dtype), grad_b.to(self.biases[0].dtype)
        optimizer.step()
        self.privacy.count_step()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def unstack(self) -> list[TabularMLP]:
        """The K heads, each carrying its DP state (checkpointed by ``PrivacyStateMixin``)."""
        models = super().unstack()
        for model, state in zip(models, self.privacy.states()):
            model.dp_state = state
        return models
