"""Attack classifiers trained on shadow (original, unlearned) pairs: random forest, logistic regression and an MLP.

Chen et al. (ACM CCS 2021) compare several attack models; here ``rf`` (scikit-learn random
forest, 100 trees), ``lr`` (logistic regression on standardised features) and ``mlp`` (a small
LightningModule trained with Lightning, standardised features, one hidden layer). Each returns the
probability that a feature row is a positive (a deleted sample), the attack's score.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mia_lightning.errors import MiaError

CLASSIFIERS = ("rf", "lr", "mlp")


class AttackMLP(L.LightningModule):
    """Binary attack classifier: standardise -> Linear -> ReLU -> Linear -> logit of "positive"."""

    def __init__(self, n_features: int, hidden: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def fit_scaling(self, features: torch.Tensor) -> None:
        """Standardisation fitted on the training features (constant columns keep scale 1)."""
        std = features.std(dim=0)
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self(x), y)
        self.log("attack_loss", loss)
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _trainer(max_epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def fit_mlp(features: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 100, batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """Train an ``AttackMLP`` with Lightning; returns its positive-class probability function."""
    torch.manual_seed(seed)
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32)
    module = AttackMLP(x.shape[1])
    module.fit_scaling(x)
    generator = torch.Generator().manual_seed(seed)
    _trainer(epochs).fit(module, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator))

    def predict(rows: np.ndarray) -> np.ndarray:
        batches = _trainer(1).predict(module, DataLoader(TensorDataset(torch.as_tensor(rows, dtype=torch.float32)), batch_size=4096))
        return torch.cat(batches).double().numpy()

    return predict


def fit_classifier(kind: str, features: np.ndarray, labels: np.ndarray, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Fit attack classifier ``kind`` on shadow features [N, d] and labels bool [N]; returns rows -> P(positive) float64."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise MiaError(f"attack classifier {kind}: the shadow pairs have a single class ({int(labels.sum())} positives of {labels.size}); "
                       "the plan needs shadow chains with both deleted samples and negatives")
    if kind == "mlp":
        return fit_mlp(features, labels, seed)
    if kind == "rf":
        from sklearn.ensemble import RandomForestClassifier

        model = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1).fit(features, labels)
    elif kind == "lr":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features, labels)
    else:
        raise MiaError(f"attack classifier {kind!r}: choose one of {', '.join(CLASSIFIERS)}")
    return lambda rows: model.predict_proba(rows)[:, 1].astype(np.float64)
