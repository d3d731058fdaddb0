"""K tabular MLPs trained at once in one process: stacked weights and batched matrix products.

Layer l of model k is ``W[l][k]`` ([in, out]) and ``b[l][k]``; a forward pass over per-model
batches x [K, B, d] is one ``torch.baddbmm`` per layer. Batched weights beat
``torch.func.vmap(functional_call)`` on CPU: the same bmm kernels without vmap's per-call batching
rules (forward + backward of 64 MLPs [256], batch 64, on 2 cores: 3.7 ms against 5.6 ms), and plain
parameters that any torch optimiser updates. Adam, AdamW and SGD (with momentum and weight decay)
act elementwise, so one optimiser over the stacked parameters is K independent optimisers; the loss
is the sum of each model's mean cross-entropy, so each model gets exactly its own gradient.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mia_lightning.models.tabular_mlp import TabularMLP, make_optimizer


def _linears(model: TabularMLP) -> list[nn.Linear]:
    return [layer for layer in model.net if isinstance(layer, nn.Linear)]


class PerModelClipping:
    """Mixin for an ensemble LightningModule whose every parameter is stacked along dim 0 (one slice per model)."""

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Clip by norm per model (as ``Trainer(gradient_clip_val=...)`` clips each sequential model); by value is elementwise already."""
        if not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
        scale = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.view(-1, *[1] * (grad.dim() - 1)))


class VectorisedMLP(PerModelClipping, L.LightningModule):
    """An ensemble of K ``TabularMLP``s with identical architecture and hyper-parameters.

    ``pool_features`` / ``pool_labels`` hold the whole audit pool (buffers, so they move to the
    module's device and batches are gathered there); a training batch is an index tensor [K, B]
    (model k's own minibatch of pool ids), a predict batch a tensor of pool ids [b]. With
    ``pool_views`` [n, Q, d] (features of Q query views, e.g. augmentations of an image) models
    train on ``pool_features`` and predict every view.
    """

    def __init__(self, models: list[TabularMLP], pool_features: torch.Tensor, pool_labels: torch.Tensor, pool_views: torch.Tensor | None = None) -> None:
        super().__init__()
        if any(dict(model.hparams) != dict(models[0].hparams) for model in models):
            raise ValueError("VectorisedMLP stacks models with identical hyper-parameters only")
        self.hparams.update(models[0].hparams)
        self.model_class = type(models[0])
        layers = [_linears(model) for model in models]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([m[i].weight.detach().t() for m in layers]).contiguous()) for i in range(len(layers[0])))
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([m[i].bias.detach() for m in layers]).unsqueeze(1)) for i in range(len(layers[0])))
        self.register_buffer("feature_mean", torch.stack([m.feature_mean for m in models]).unsqueeze(1))
        self.register_buffer("feature_std", torch.stack([m.feature_std for m in models]).unsqueeze(1))
        self.register_buffer("pool_features", pool_features.float(), persistent=False)
        self.register_buffer("pool_labels", pool_labels.long(), persistent=False)
        self.register_buffer("pool_views", None if pool_views is None else pool_views.float(), persistent=False)
        self.dropout = float(models[0].hparams.dropout)
        self.temperature = float(models[0].hparams.get("temperature", 1.0))  # TabularMLP's logit temperature (1: none)
        self._batch: torch.Tensor | None = None

    @property
    def n_models(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, B, d] raw features -> logits [K, B, C]."""
        return self._logits((x - self.feature_mean) / self.feature_std)

    def _standardised_batch(self, index: torch.Tensor) -> torch.Tensor:
        """Pool features of ids [K, B], standardised per model, in a buffer reused every step.

        A fresh [K, B, d] tensor per step (32 MiB for 256 heads on 512 features) is a new mmap and its
        page faults on CPU, which cost more than the step's matrix products; the values are bit-identical.
        """
        shape = (index.numel(), self.pool_features.shape[1])
        if self._batch is None or self._batch.shape != shape or self._batch.device != self.pool_features.device:
            self._batch = self.pool_features.new_empty(shape)
        x = torch.index_select(self.pool_features, 0, index.flatten(), out=self._batch).view(*index.shape, -1)
        return x.sub_(self.feature_mean).div_(self.feature_std)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Standardised features [K, B, d] -> logits [K, B, C] (dropout masks are drawn per model and sample)."""
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < last:
                h = F.dropout(F.relu(h), self.dropout, self.training)
        return h if self.temperature == 1.0 else h / self.temperature

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``batch`` [K, B] pool ids; loss = sum over models of each model's mean cross-entropy."""
        logits = self._logits(self._standardised_batch(batch))
        per_sample = F.cross_entropy(logits.flatten(0, 1).float(), self.pool_labels[batch].flatten(), reduction="none")
        loss = per_sample.view(batch.shape).mean(dim=1).sum()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Logits [K, b, Q, C] in float32 of every model on pool ids ``batch`` (Q = 1 without ``pool_views``)."""
        if self.pool_views is not None:
            views = self.pool_views[batch]
            x = views.flatten(0, 1).unsqueeze(0).expand(self.n_models, -1, -1)
            return self(x).float().view(self.n_models, *views.shape[:2], -1)
        x = self.pool_features[batch].unsqueeze(0).expand(self.n_models, -1, -1)
        return self(x).float().unsqueeze(2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.fused_optimizer)

    def unstack(self) -> list[TabularMLP]:
        """K single models carrying the trained weights and scaling (checkpoints identical in format to the sequential farm)."""
        models = []
        for k in range(self.n_models):
            model = self.model_class(**self.hparams)
            with torch.no_grad():
                for layer, weight, bias in zip(_linears(model), self.weights, self.biases):
                    layer.weight.copy_(weight[k].t())
                    layer.bias.copy_(bias[k, 0])
                model.feature_mean.copy_(self.feature_mean[k, 0])
                model.feature_std.copy_(self.feature_std[k, 0])
            models.append(model.eval())
        return models
