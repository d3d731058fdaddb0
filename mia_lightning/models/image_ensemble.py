"""K image classifiers (``ImageClassifier``, one recipe) trained at once: one ``torch.func.functional_call`` vmapped over per-model tensors.

Every tensor of the K timm models is either **per model** (stacked [K, ...]: the trainable ones, and
any other that differs between the models or that training changes) or **shared** (one copy: a
frozen parameter or buffer equal in all K models, e.g. the pretrained convolutions in ``film`` and
``head`` mode). ``torch.func.vmap`` maps one ``functional_call`` of a weightless copy of the model
over the per-model tensors and model k's own minibatch; a shared convolution then runs once over
the K x B images of the step, a per-model one as a grouped convolution.

BatchNorm follows ``ImageClassifier.train`` exactly. ``film`` and ``head``: the backbone stays in
eval mode, so BatchNorm normalises with the frozen running statistics (shared when the models were
built from the same weights) and only its scale and shift train. ``full``: train mode, batch
statistics of each model's own minibatch, and per-model running statistics updated in place as the
single model updates its own. An eval-mode BatchNorm is computed as the affine map it is
(``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``, ``FrozenBatchNormAsAffine``):
vmap's generic BatchNorm rule moves the model dimension into the channels and copies every
activation, which made a FiLM step (MobileNetV2, K = 4, B = 20) 1.4-2.7x slower on the CPU; the
affine form is a broadcast.

Adam, AdamW and SGD act elementwise, so one optimiser over the stacked parameters is K independent
optimisers; the loss is the sum of each model's mean cross-entropy, so each model gets exactly its
own gradient. Dropout / drop-path draw per model (``randomness="different"``): the same
distribution as the single model, not the same draws.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from mia_lightning.models.ensemble import PerModelClipping
from mia_lightning.models.image import ImageClassifier
from mia_lightning.models.tabular_mlp import make_optimizer

_BATCH_NORM = inspect.signature(F.batch_norm)


class FrozenBatchNormAsAffine(TorchFunctionMode):
    """Within the block, ``F.batch_norm`` with running statistics and ``training=False`` runs as one per-channel affine map (other calls unchanged)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if not a["training"] and a["running_mean"] is not None and a["running_var"] is not None:
                x = a["input"]
                scale = torch.rsqrt(a["running_var"] + a["eps"])
                if a["weight"] is not None:
                    scale = scale * a["weight"]
                shift = -a["running_mean"] * scale
                if a["bias"] is not None:
                    shift = shift + a["bias"]
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return torch.addcmul(shift.view(shape), x, scale.view(shape))
        return func(*args, **kwargs)


def largest_activation(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of the largest output any layer of ``model`` produces for the single sample ``x`` [1, ...] (eval mode): sizes predict batches."""
    sizes = [x[0].numel()]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel() if isinstance(out, torch.Tensor) else 0))
             for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return max(sizes)


def _equal(tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


class VectorisedImageClassifier(PerModelClipping, L.LightningModule):
    """An ensemble of K ``ImageClassifier``s with identical hyper-parameters (any fine-tuning mode).

    ``pool_images`` uint8 [n, H, W, c] / ``pool_labels`` [n] hold the whole pool (buffers, so batches
    are gathered and preprocessed on the module's device by ``preprocess``: uint8 [b, H, W, c] ->
    float [b, ch, s, s]); ``views`` makes every query view [b, Q, ch, s, s]. A training batch is an
    index tensor [K, B] (model k's minibatch of pool ids), a predict batch pool ids [b] that every
    model reads.
    """

    def __init__(self, models: list[ImageClassifier], pool_images: torch.Tensor, pool_labels: torch.Tensor,
                 preprocess: Callable[[torch.Tensor], torch.Tensor], views: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        if any(dict(model.hparams) != dict(models[0].hparams) for model in models):
            raise ValueError("VectorisedImageClassifier stacks models with identical hyper-parameters only")
        self.hparams.update(models[0].hparams)
        self.template = (copy.deepcopy(models[0]).cpu(),)  # a tuple: not a submodule (unstack copies it; never trained)
        self.skeleton = (copy.deepcopy(models[0].model).to("meta"),)  # the architecture without weights, for functional_call
        self.preprocess, self.views = preprocess, views
        parameters = [dict(model.model.named_parameters()) for model in models]
        buffers = [dict(model.model.named_buffers()) for model in models]
        updated = self.hparams.finetune == "full"  # train-mode BatchNorm updates its running statistics
        self.trainable_names, self.stacked_names, self.shared_names = [], [], []
        trainable, stacked, shared = [], [], []
        for name, parameter in parameters[0].items():
            tensors = [named[name].detach() for named in parameters]
            if parameter.requires_grad:
                self.trainable_names.append(name)
                trainable.append(nn.Parameter(torch.stack(tensors).contiguous()))
            elif _equal(tensors):
                self.shared_names.append(name)
                shared.append(tensors[0].clone())
            else:
                self.stacked_names.append(name)
                stacked.append(torch.stack(tensors))
        for name in buffers[0]:
            tensors = [named[name].detach() for named in buffers]
            if not updated and _equal(tensors):
                self.shared_names.append(name)
                shared.append(tensors[0].clone())
            else:
                self.stacked_names.append(name)
                stacked.append(torch.stack(tensors))
        self.trainable = nn.ParameterList(trainable)
        for prefix, tensors in (("stacked", stacked), ("shared", shared)):
            for i, tensor in enumerate(tensors):
                self.register_buffer(f"{prefix}_{i}", tensor)
        self.register_buffer("pool_images", pool_images, persistent=False)
        self.register_buffer("pool_labels", pool_labels.long(), persistent=False)

    @property
    def n_models(self) -> int:
        return self.trainable[0].shape[0]

    def _tensors(self, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"{prefix}_{i}") for i, name in enumerate(names)}

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """Images [K, B, ch, s, s] (model k reads row k), or [B, ch, s, s] read by every model with ``shared_input`` -> logits [K, B, C]."""
        skeleton = self.skeleton[0]
        skeleton.train(self.training and self.hparams.finetune == "full")  # ImageClassifier.train's rule
        per_model = {**dict(zip(self.trainable_names, self.trainable)), **self._tensors("stacked", self.stacked_names)}
        shared = self._tensors("shared", self.shared_names)

        def one_model(tensors: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
            return functional_call(skeleton, {**tensors, **shared}, (images,))

        with FrozenBatchNormAsAffine(), warnings.catch_warnings():  # timm's global pooling calls as_strided_, which vmap loops per model: a tiny op
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
            return vmap(one_model, in_dims=(0, None if shared_input else 0), randomness="different")(per_model, x)

    def _images(self, ids: torch.Tensor) -> torch.Tensor:
        """Preprocessed pool images of ``ids`` (any shape) -> [*ids.shape, ch, s, s], in the parameters' dtype."""
        x = self.preprocess(self.pool_images[ids.flatten()]).to(self.trainable[0].dtype)
        return x.view(*ids.shape, *x.shape[1:])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``batch`` [K, B] pool ids; loss = sum over models of each model's mean cross-entropy (float32, as ``ClassifierSteps``)."""
        logits = self(self._images(batch))
        per_sample = F.cross_entropy(logits.flatten(0, 1).float(), self.pool_labels[batch].flatten(), reduction="none")
        loss = per_sample.view(batch.shape).mean(dim=1).sum()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Logits [K, b, Q, C] in float32 of every model on every query view of pool ids ``batch`` (the export format per model)."""
        views = self.views(self._images(batch))
        return self(views.flatten(0, 1), shared_input=True).float().view(self.n_models, *views.shape[:2], -1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)

    def unstack(self) -> list[ImageClassifier]:
        """K single models carrying the trained tensors (checkpoints identical in format to the sequential farm)."""
        shared = {name: t.detach().cpu() for name, t in self._tensors("shared", self.shared_names).items()}
        per_model = {**dict(zip(self.trainable_names, self.trainable)), **self._tensors("stacked", self.stacked_names)}
        models = []
        for k in range(self.n_models):
            model = copy.deepcopy(self.template[0]).to(self.trainable[0].dtype)  # the dtype the sequential farm's model ends in (e.g. 64-true)
            model.model.load_state_dict({**shared, **{name: t[k].detach().cpu() for name, t in per_model.items()}})
            models.append(model.eval())
        return models
