"""Image classifiers around any timm model, fine-tuned in one of three modes, and linear heads on cached features.

``ImageClassifier`` wraps ``timm.create_model(backbone, num_classes=C, ...)`` (weights: see
``models.pretrained``) and fine-tunes (Tobaben et al., "Impact of Dataset Properties on Membership
Inference Vulnerability of Deep Transfer Learning", NeurIPS 2025 / arXiv 2402.06674):

- ``full``: every parameter;
- ``head``: the classifier only, on the frozen backbone;
- ``film``: the scale and shift of every normalisation layer (BatchNorm / LayerNorm / GroupNorm) plus the
  classifier (FiLM as in Shysheya et al., "FiT: Parameter Efficient Few-shot Transfer Learning for
  Personalized and Federated Image Classification", ICLR 2023).

In ``head`` and ``film`` mode the backbone stays in eval mode while training (running BatchNorm
statistics and dropout frozen), so only the chosen parameters change. ``predict_step`` exports the
logits of every query view, [b, Q, C]. Mixed precision and devices come from the Trainer.

``FeatureHead`` is the head-only mode on the vectorised farm: a ``TabularMLP`` (``hidden: []`` = one
linear layer) on the backbone features cached by ``data.images.ImageFeatureDataModule``; it predicts
every query view's features at once.
"""

from __future__ import annotations

from typing import Iterable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from mia_lightning.errors import MiaError
from mia_lightning.models.pretrained import create_backbone
from mia_lightning.models.steps import ClassifierSteps
from mia_lightning.models.tabular_mlp import OPTIMIZERS, TabularMLP, make_optimizer

FINETUNE_MODES: tuple[str, ...] = ("full", "head", "film")
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def normalisation_layers(model: nn.Module) -> list[nn.Module]:
    """The model's normalisation layers with a learnable scale or shift (torch's BatchNorm / LayerNorm / GroupNorm and subclasses such as timm's)."""
    return [m for m in model.modules() if isinstance(m, NORM_TYPES) and any(True for _ in m.parameters(recurse=False))]


class ImageClassifier(ClassifierSteps, L.LightningModule):
    """A timm classifier fine-tuned in ``full``, ``head`` or ``film`` mode; exports logits [b, Q, C] for Q query views.

    ``backbone``, ``weights``, ``n_classes`` and ``img_size`` usually come from the DataModule
    (``ImageDataModule.model_kwargs()``); ``model_args`` are extra ``timm.create_model`` arguments
    (e.g. ``drop_rate``).
    """

    NAME_ARGS = {"weights": ("random", "timm", "offline"), "model_args": ()}
    """Arguments that name weights to load (checked by ``mia_lightning.names`` when a file names this class)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        n_classes: int = 10,
        finetune: str = "head",
        weights: str | None = "random",
        img_size: int | None = None,
        model_args: dict | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise MiaError(f"model.init_args.finetune {finetune!r}: choose one of {', '.join(FINETUNE_MODES)}")
        if optimizer not in OPTIMIZERS:
            raise MiaError(f"model.init_args.optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        self.save_hyperparameters()
        extra = dict(model_args or {})
        if img_size is not None:
            extra["img_size"] = img_size
        self.model = create_backbone(backbone, weights, num_classes=n_classes, **extra)
        self._freeze()
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)

    def _freeze(self) -> None:
        """Leave only the mode's parameters trainable."""
        if self.hparams.finetune == "full":
            return
        trainable = set(map(id, self.model.get_classifier().parameters()))
        if self.hparams.finetune == "film":
            trainable |= {id(p) for layer in normalisation_layers(self.model) for p in layer.parameters(recurse=False)}
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "ImageClassifier":
        """Train mode, except that the frozen backbone of ``head`` / ``film`` stays in eval mode (BatchNorm statistics, dropout)."""
        super().train(mode)
        if mode and self.hparams.finetune != "full":
            self.model.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Lightning leaves modules in the mode they were built in (train): apply the mode's eval backbone before every epoch."""
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits float32 [b, Q, C] of every query view ``batch[0]`` [b, Q, ch, s, s]."""
        x = batch[0]
        b, q = x.shape[:2]
        return self(x.flatten(0, 1)).float().view(b, q, -1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return make_optimizer(self.trainable_parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)

    def per_sample_gradient_norms(self, datamodule: L.LightningDataModule) -> np.ndarray:
        """float64 [n]: the norm of each pool sample's cross-entropy gradient w.r.t. the trainable parameters (eval mode)."""
        return autograd_gradient_norms(self, self.trainable_parameters(), datamodule.pool_dataloader())


class FeatureHead(TabularMLP):
    """A linear head (``hidden: []``, or a small MLP) on cached backbone features; predicts every query view.

    Training and feature scaling are the tabular MLP's, so the vectorised farm trains hundreds at once.
    """

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits float32 [b, Q, C] for features [b, Q, d] (or [b, 1, C] for [b, d])."""
        x = batch[0]
        logits = self(x).float()
        return logits if x.dim() == 3 else logits.unsqueeze(1)

    def per_sample_gradient_norms(self, datamodule: L.LightningDataModule) -> np.ndarray:
        """float64 [n]: each pool sample's cross-entropy gradient norm w.r.t. all head parameters.

        For one linear layer on standardised features x~ it is closed-form: the gradient of
        CE(W x~ + b, y) is (p - e_y) [x~, 1]^T, whose norm is ||p - e_y|| * ||[x~, 1]||.
        """
        features = torch.from_numpy(np.asarray(datamodule.pool_features())).double()
        labels = torch.from_numpy(np.asarray(datamodule.pool_labels()))
        if len(self.hparams.hidden) > 0 or self.hparams.get("temperature", 1.0) != 1.0:  # the closed form is for a plain linear head
            return autograd_gradient_norms(self, list(self.parameters()), datamodule.pool_dataloader())
        with torch.no_grad():
            scaled = (features - self.feature_mean.double()) / self.feature_std.double()
            layer = self.net[0]
            p = torch.softmax(scaled @ layer.weight.double().T + layer.bias.double(), dim=-1)
            p[torch.arange(len(labels)), labels] -= 1.0
            return (torch.linalg.vector_norm(p, dim=1) * torch.sqrt((scaled**2).sum(1) + 1.0)).numpy()


def autograd_gradient_norms(module: nn.Module, parameters: list[nn.Parameter], loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """float64 [n]: per-sample gradient norms of the cross-entropy w.r.t. ``parameters`` with ``torch.func`` (eval mode, loader order)."""
    from torch.func import functional_call, grad, vmap

    if not parameters:
        raise MiaError(f"{type(module).__name__}: no trainable parameters to take gradients of")
    names = {id(p): name for name, p in module.named_parameters()}
    trainable = {names[id(p)]: p.detach() for p in parameters}
    fixed = {name: p.detach() for name, p in module.named_parameters() if name not in trainable}
    buffers = dict(module.named_buffers())
    was_training = module.training
    module.eval()

    def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, {**params, **fixed, **buffers}, (x.unsqueeze(0),))
        return F.cross_entropy(logits.float(), y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    norms = []
    for x, y in loader:
        grads = per_sample(trainable, x, y)
        squared = sum(g.double().flatten(1).pow(2).sum(1) for g in grads.values())
        norms.append(squared.sqrt())
    module.train(was_training)
    return torch.cat(norms).numpy()
