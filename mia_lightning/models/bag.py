"""Bag-of-words text classifier: a DP-friendly model family beside the LSTM.

A review becomes its bag of words: the set of distinct vocabulary ids it contains (padding left out),
as a presence vector of length ``vocab_size`` scaled to unit L2 norm (each of its k distinct words
weighs 1 / sqrt(k)). With ``embedding_dim: 0`` the model is a linear classifier on that vector
(multinomial logistic regression); with ``embedding_dim: D`` it is a bag of embeddings: the weighted
sum of the words' D-dimensional embeddings (an embedding table without bias, stored as a
``Linear(vocab_size, D)`` so opacus computes exact per-sample gradients, repeated words included),
then a ``Linear(D, C)`` head.

Why it suits DP-SGD: the input vector has norm 1, so a sample's gradient of the first layer is
bounded by the gradient of the logits (no single review can dominate through its length), every
parameter is one opacus' ``Linear`` grad sampler handles, and one step costs one batched matmul, so
the large Poisson batches DP-SGD needs are cheap. Word order is ignored: on sentiment this loses
little (bag-of-words logistic regression was the strong baseline of Maas et al.'s IMDB paper).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from mia_lightning.defences.dp_sgd import PrivacyStateMixin
from mia_lightning.models.lstm import OPTIMIZERS, make_optimizer
from mia_lightning.models.steps import ClassifierSteps

PAD_ID = 0
"""The padding id of ``mia_lightning.data.text`` (models sit below data in the layers, so it is restated here)."""


def bag_weights(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bag of words of token ids [b, L] in sparse form: ids [b, L] (each row's tokens sorted) and float weights [b, L].

    The first copy of each of a row's k distinct words (padding left out) weighs 1 / sqrt(k), repeats and
    padding 0: the one definition of the features, which ``bag_of_words`` scatters into a dense vector and
    the stacked ensemble (``models.bag_ensemble``) sums embeddings over.
    """
    ids = tokens.sort(dim=1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first &= ids != PAD_ID
    counts = first.sum(dim=1, keepdim=True).clamp(min=1)
    return ids, first / counts.sqrt()


def bag_of_words(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float [b, vocab_size]: presence of each vocabulary id in each row of ``tokens`` [b, L] (padding ignored), scaled to unit L2 norm.

    A row of padding only maps to the zero vector.
    """
    ids, weights = bag_weights(tokens)
    return torch.zeros(tokens.shape[0], vocab_size, device=tokens.device).scatter_add_(1, ids, weights)


class BagOfWordsClassifier(ClassifierSteps, PrivacyStateMixin, L.LightningModule):
    """Token ids [b, L] -> logits [b, C] through the L2-normalised bag of words (see the module docstring); ``predict_step`` exports [b, 1, C]."""

    def __init__(
        self,
        vocab_size: int = 10000,
        n_classes: int = 2,
        embedding_dim: int = 0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if vocab_size < 3 or n_classes < 2 or embedding_dim < 0:
            raise ValueError(f"vocab_size {vocab_size} must be >= 3, n_classes {n_classes} >= 2 and embedding_dim {embedding_dim} >= 0")
        self.save_hyperparameters()
        self.embedding = nn.Linear(vocab_size, embedding_dim, bias=False) if embedding_dim else None
        self.head = nn.Linear(embedding_dim or vocab_size, n_classes)
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [b, C] of token ids [b, L]."""
        features = bag_of_words(tokens, self.hparams.vocab_size).to(self.head.weight.dtype)
        return self.head(features if self.embedding is None else self.embedding(features))

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits [batch, n_queries=1, n_classes] in float32 (the export format)."""
        return self(batch[0]).float().unsqueeze(1)

    def configure_optimizers(self) -> Any:
        return make_optimizer(self.parameters(), self.hparams)
