"""K tabular MLPs trained at once in one process: stacked weights and batched matrix products.

Layer l of model k is ``W[l][k]`` ([in, out]) and ``b[l][k]``; a forward pass over per-model
batches x [K, B, d] is one ``torch.baddbmm`` per layer. Batched weights beat
``torch.func.vmap(functional_call)`` here: the same bmm kernels without vmap's per-call tracing, and
plain parameters that any torch optimiser updates. Adam, AdamW and SGD (with momentum and weight
decay) act elementwise, so one optimiser over the stacked parameters is K independent optimisers;
the loss is the sum of each model's mean cross-entropy, so each model gets its own gradient.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mia_lightning.models.tabular_mlp import TabularMLP, make_optimizer


class VectorisedMLP(L.LightningModule):
    """An ensemble of K ``TabularMLP``s with identical architecture and hyper-parameters.

    ``pool_features`` / ``pool_labels`` hold the whole audit pool; a training batch is an index
    tensor [K, B] (model k's own minibatch of pool ids), a predict batch a tensor of pool ids [b].
    """

    def __init__(self, models: list[TabularMLP], pool_features: torch.Tensor, pool_labels: torch.Tensor) -> None:
        super().__init__()
        self.hparams.update(models[0].hparams)
        linears = [[m for m in model.net if isinstance(m, nn.Linear)] for model in models]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].weight.detach().t() for layers in linears]).contiguous()) for i in range(len(linears[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].bias.detach() for layers in linears]).unsqueeze(1)) for i in range(len(linears[0]))
        )
        self.register_buffer("feature_mean", torch.stack([m.feature_mean for m in models]).unsqueeze(1))
        self.register_buffer("feature_std", torch.stack([m.feature_std for m in models]).unsqueeze(1))
        self.register_buffer("pool_features", pool_features.float(), persistent=False)
        self.register_buffer("pool_labels", pool_labels.long(), persistent=False)
        self.dropout = float(models[0].hparams.dropout)

    @property
    def n_models(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, B, d] raw features -> logits [K, B, C]."""
        h = (x - self.feature_mean) / self.feature_std
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < last:
                h = F.dropout(F.relu(h), self.dropout, self.training)
        return h

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        index = batch.squeeze(0) if batch.dim() == 3 else batch
        logits = self(self.pool_features[index])
        per_sample = F.cross_entropy(logits.flatten(0, 1).float(), self.pool_labels[index].flatten(), reduction="none")
        loss = per_sample.view(index.shape).mean(dim=1).sum()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Logits [K, b, 1, C] in float32 of every model on pool ids ``batch``."""
        x = self.pool_features[batch].unsqueeze(0).expand(self.n_models, -1, -1)
        return self(x).float().unsqueeze(2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)

    def unstack(self) -> list[TabularMLP]:
        """K single ``TabularMLP``s carrying the trained weights (checkpoints identical in format to the sequential farm)."""
        models = []
        for k in range(self.n_models):
            model = TabularMLP(**self.hparams)
            linears = [m for m in model.net if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for layer, weight, bias in zip(linears, self.weights, self.biases):
                    layer.weight.copy_(weight[k].t())
                    layer.bias.copy_(bias[k, 0])
                model.feature_mean.copy_(self.feature_mean[k, 0])
                model.feature_std.copy_(self.feature_std[k, 0])
            models.append(model.eval())
        return models
