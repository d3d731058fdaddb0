"""The training and validation steps every classifier family shares: cross-entropy, accuracy logged per epoch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassifierSteps:
    """LightningModule mixin: ``training_step`` / ``validation_step`` on (x, y) batches.

    The module provides ``forward`` and ``train_accuracy`` / ``val_accuracy`` torchmetrics; the loss is
    taken in float32 so mixed-precision logits give the same objective.
    """

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.train_accuracy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """``val_loss`` (the plain cross-entropy, what early stopping monitors) and ``val_acc``, averaged over the epoch."""
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits.float(), y), prog_bar=True, batch_size=y.numel())
        self.log("val_acc", self.val_accuracy, prog_bar=True, batch_size=y.numel())
