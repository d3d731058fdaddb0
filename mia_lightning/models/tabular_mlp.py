"""Tabular MLP LightningModule: standardise -> [Linear -> ReLU -> Dropout]* -> Linear [-> / temperature].

The feature standardisation is a buffer of the model, fitted on the model's own training subset
(``fit_standardizer`` / ``on_fit_start``), so a checkpoint alone reproduces the model's logits
on raw pool features. With ``hidden=[]`` it is a linear (logistic-regression) head. Under DP-SGD
(``defences.dp_sgd.DPSGD``) the scaling comes from the whole audit pool instead (``pool_feature_stats``):
statistics of the training subset would release membership outside the DP guarantee, while the pool's
are the same for every model whatever it trained on.

``temperature`` T != 1 divides the logits by T inside the model, so it trains and answers at
temperature T and the exported logits are the released model's (softmax(z / T) is what it
publishes): the temperature-scaling defence of Chen et al. (ACM CCS 2021, Section 7) as part of
the released model, unlike an attack-time rescaling of stored logits.
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning as L
import torch
import torchmetrics
from torch import nn

from mia_lightning.defences.dp_sgd import PrivacyStateMixin, dp_callbacks
from mia_lightning.models.steps import ClassifierSteps

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(parameters: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float, momentum: float,
                   fused: bool | None = False) -> torch.optim.Optimizer:
    """The optimiser ``name`` of ``OPTIMIZERS`` (``momentum`` for SGD only), for every model family: the tabular MLP, its
    vectorised ensemble and the image classifiers directly, the text families through ``models.lstm.make_optimizer``.

    The default per-parameter kernels compute each element identically whatever the tensor's shape,
    so sequential and vectorised farms give bit-identical models. ``fused=True`` uses torch's fused
    kernel: a 64-model Adam step takes 0.27 ms instead of 3.9 ms on the CPU (40% of a vectorised
    step), but its rounding depends on the layout, so the two farms then agree only to ~1e-3.
    ``fused=None`` passes no ``fused`` argument: torch picks its default kernels.
    """
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if fused is not None:
        kwargs["fused"] = fused
    if name == "sgd":
        kwargs["momentum"] = momentum
    return OPTIMIZERS[name](parameters, **kwargs)


def build_mlp(n_features: int, n_classes: int, hidden: list[int], dropout: float) -> nn.Sequential:
    """The layer stack shared by the single model and the vectorised ensemble (for its initialisation)."""
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class TabularMLP(ClassifierSteps, PrivacyStateMixin, L.LightningModule):
    """An MLP classifier on tabular features (depth, width, dropout, optimiser and weight decay configurable)."""

    def __init__(
        self,
        n_features: int = 64,
        n_classes: int = 10,
        hidden: list[int] | None = None,
        dropout: float = 0.0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        fused_optimizer: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not temperature > 0:
            raise ValueError(f"temperature {temperature}: must be > 0 (1 is no scaling)")
        if any(width < 1 for width in hidden or []) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"hidden {list(hidden or [])} and dropout {dropout}: every hidden width must be >= 1 ([] for a linear model) and dropout lie in [0, 1)")
        self.save_hyperparameters()
        self.net = build_mlp(n_features, n_classes, list(hidden if hidden is not None else [128]), dropout)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)

    def fit_standardizer(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the feature scaling (constant features keep scale 1)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def on_fit_start(self) -> None:
        """Fit the scaling on this model's training subset (on the whole pool under DP-SGD), unless the model continues a parent's training (the farm sets ``continues_from_parent``)."""
        datamodule = self.trainer.datamodule
        if getattr(self, "continues_from_parent", False) or datamodule is None or not hasattr(datamodule, "train_feature_stats"):
            return
        stats = datamodule.pool_feature_stats() if dp_callbacks(self.trainer.callbacks) else datamodule.train_feature_stats()
        self.fit_standardizer(*(t.to(self.device) for t in stats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net((x - self.feature_mean) / self.feature_std)
        return logits if self.hparams.temperature == 1.0 else logits / self.hparams.temperature

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits [batch, n_queries=1, n_classes] in float32 (the export format)."""
        return self(batch[0]).float().unsqueeze(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.fused_optimizer)
