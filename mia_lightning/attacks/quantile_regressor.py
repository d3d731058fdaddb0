"""The quantile-regression attack's regressors (``quantile.py``): T independent pinball-loss fits as one batched LightningModule.

Kept apart from the attack so that its parameters are checked before torch and Lightning load.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mia_lightning.interrupts import call_trainer


def pinball_loss(predicted: torch.Tensor, observed: torch.Tensor, quantile: float) -> torch.Tensor:
    """Elementwise pinball (quantile) loss max(tau (s - q), (tau - 1)(s - q)); its minimiser over q is the tau-quantile of s."""
    residual = observed - predicted
    return torch.maximum(quantile * residual, (quantile - 1.0) * residual)


class BatchedQuantileRegressor(L.LightningModule):
    """T independent regressors (one per target model) in one module: inputs [B, F] -> predicted quantiles [T, B].

    ``hidden`` > 0: one ReLU hidden layer of that width; 0: a linear quantile regression. A training
    batch is (inputs [B, F], observed scores [B, T]); the loss is the sum over targets of each
    target's mean pinball loss, so every target's weights get exactly its own gradient.
    """

    def __init__(self, n_models: int, n_features: int, hidden: int, quantile: float, lr: float, weight_decay: float, start: torch.Tensor) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["start"])

        def uniform(*size: int, fan_in: int) -> nn.Parameter:  # nn.Linear's default initialisation, one draw per regressor
            return nn.Parameter((torch.rand(n_models, *size) * 2 - 1) / fan_in**0.5)

        width = hidden or n_features
        self.w1 = uniform(n_features, hidden, fan_in=n_features) if hidden else None
        self.b1 = uniform(1, hidden, fan_in=n_features) if hidden else None
        self.w2 = uniform(width, fan_in=width)
        self.b2 = nn.Parameter(start.float().reshape(n_models, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted quantiles [T, B] of inputs x [B, F]."""
        if self.w1 is None:
            return torch.einsum("bf,tf->tb", x, self.w2) + self.b2
        h = torch.relu(torch.einsum("bf,tfh->tbh", x, self.w1) + self.b1)
        return torch.einsum("tbh,th->tb", h, self.w2) + self.b2

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, observed = batch
        return pinball_loss(self(x), observed.T, self.hparams.quantile).mean(dim=1).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def fit_quantile_regressors(inputs: np.ndarray, observed: np.ndarray, quantile: float, hidden: int = 64, epochs: int = 100,
                            batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0) -> BatchedQuantileRegressor:
    """Fit T quantile regressors on inputs [p, F] (float32, standardised) and observed scores [p, T]; returns the trained module (eval mode)."""
    with torch.inference_mode(False), torch.enable_grad():  # scoring runs inside Trainer.predict
        torch.manual_seed(seed)
        x, s = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(observed, dtype=np.float32))
        start = torch.quantile(s, quantile, dim=0)
        module = BatchedQuantileRegressor(s.shape[1], x.shape[1], hidden, quantile, lr, weight_decay, start)
        loader = DataLoader(TensorDataset(x, s), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        call_trainer(trainer.fit, module, loader)
    return module.eval()


def predict_quantiles(module: BatchedQuantileRegressor, inputs: np.ndarray) -> np.ndarray:
    """float64 [T, n]: every target's predicted quantile at each row of ``inputs`` [n, F] (float32)."""
    with torch.no_grad():
        return module(torch.from_numpy(inputs)).double().numpy()
