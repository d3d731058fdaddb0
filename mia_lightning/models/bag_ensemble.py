"""K bag-of-words text classifiers (``models.bag``) trained at once: stacked tables, one embedding-bag sum for all models.

Model k's first layer is a table ``table[k]`` [V, W] (the bag of embeddings' [V, D] table, or with
``embedding_dim: 0`` the linear classifier's weight [V, C]) and its bag vector x is sparse: each
review's distinct words weigh 1 / sqrt(k) (``models.bag.bag_weights``, the one definition of the
features). So x^T table[k] is a weighted sum of table rows, one ``F.embedding_bag`` over all K models
(model k's ids offset by k V; backward: ``bag_transpose``, one ``index_add_``), and the dense
[K, B, V] bag vector is never built: a step reads K x B x (distinct words) rows instead of K x B x V floats. The pool's bags are computed once, their
words packed to the front of each row and cut to the longest review's count of distinct words.

Adam, AdamW and SGD act elementwise, so one optimiser over the stacked parameters is K independent
optimisers; the loss is the sum of each model's mean cross-entropy, so each model gets exactly its
own gradient. DP-SGD (``DPBagEnsemble``) trains the linear classifier: its per-sample gradient is
closed-form (``defences.dp_ensemble``), with the sparse bag as the head's input (``BagInputs``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mia_lightning.defences.dp_ensemble import EnsemblePrivacy
from mia_lightning.errors import MiaError
from mia_lightning.models.bag import BagOfWordsClassifier, bag_weights
from mia_lightning.models.dp_heads import PrivateHeadSteps
from mia_lightning.models.ensemble import PerModelClipping
from mia_lightning.models.lstm import make_optimizer


def packed_bags(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bag_weights`` of token ids [n, L] with each row's words moved to the front and the columns cut to the most words of any row: ids and weights [n, w]."""
    ids, weights = bag_weights(tokens)
    order = torch.argsort(weights == 0, dim=1, stable=True)
    width = max(1, int((weights > 0).sum(1).max()))
    return ids.gather(1, order)[:, :width].contiguous(), weights.gather(1, order)[:, :width].contiguous()


def _offset(ids: torch.Tensor, k: int, vocab: int) -> torch.Tensor:
    """Model k's word ids [K, B, w] shifted by k x vocab (rows of the flattened stacked table), flattened to [K x B, w]."""
    return (ids + torch.arange(k, device=ids.device).view(k, 1, 1) * vocab).flatten(0, 1)


SCATTER_ELEMENTS = 2**24
"""Bound on the weighted rows one ``index_add_`` of ``bag_transpose`` adds at once (64 MiB in float32)."""


def bag_transpose(ids: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, rows: int) -> torch.Tensor:
    """X^T values [rows, W] for sparse bags X (row ids and weights [N, w]) and values [N, W]: weights[n, l] x values[n] added to row ids[n, l].

    ``index_add_`` in chunks of bounded memory; torch's own ``embedding_bag`` backward with per-sample
    weights takes ~10x longer on the CPU (16 x 1,024 bags of 166 words: 380 ms against 32 ms).
    """
    out = values.new_zeros(rows, values.shape[1])
    step = max(1, SCATTER_ELEMENTS // (ids.shape[1] * values.shape[1]))
    for start in range(0, ids.shape[0], step):
        part = slice(start, start + step)
        out.index_add_(0, ids[part].flatten(), (weights[part].to(values.dtype).unsqueeze(-1) * values[part].unsqueeze(1)).flatten(0, 1))
    return out


class BagSum(torch.autograd.Function):
    """Rows of a table [R, W] summed over sparse bags (ids, weights [N, w]) -> [N, W]: forward ``F.embedding_bag``, backward ``bag_transpose``."""

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, weights)
        ctx.rows = table.shape[0]
        return F.embedding_bag(ids, table, per_sample_weights=weights.to(table.dtype), mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ids, weights = ctx.saved_tensors
        return bag_transpose(ids, weights, grad, ctx.rows), None, None


class BagInputs:
    """The heads' inputs as sparse bags (``defences.dp_ensemble.HeadInputs``): word ids and weights [K, B, w] of K models with vocabulary V."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> None:
        self.ids, self.weights, self.vocab = ids, weights, vocab

    def squared_norms(self) -> torch.Tensor:
        return (self.weights * self.weights).sum(-1)

    def transposed_product(self, weighted: torch.Tensor) -> torch.Tensor:
        """X^T weighted [K, V, C]: each sample's weighted residual added to the rows of its words."""
        k = weighted.shape[0]
        return bag_transpose(_offset(self.ids, k, self.vocab), self.weights.flatten(0, 1), weighted.flatten(0, 1), k * self.vocab).view(k, self.vocab, -1)


class VectorisedBag(PerModelClipping, L.LightningModule):
    """An ensemble of K ``BagOfWordsClassifier``s with identical hyper-parameters.

    The pool's packed bags (``packed_bags`` of ``pool_tokens`` [n, L]) and ``pool_labels`` [n] are
    buffers, so batches are gathered on the module's device; a training batch is an index tensor
    [K, B] (model k's minibatch of pool ids), a predict batch a tensor of pool ids [b] that every model reads.
    """

    def __init__(self, models: list[BagOfWordsClassifier], pool_tokens: torch.Tensor, pool_labels: torch.Tensor) -> None:
        super().__init__()
        if any(dict(model.hparams) != dict(models[0].hparams) for model in models):
            raise ValueError("VectorisedBag stacks models with identical hyper-parameters only")
        self.hparams.update(models[0].hparams)
        self.model_class = type(models[0])
        embedded = models[0].embedding is not None
        self.embedding = nn.Parameter(torch.stack([m.embedding.weight.detach().t() for m in models]).contiguous()) if embedded else None
        self.head_weight = nn.Parameter(torch.stack([m.head.weight.detach().t() for m in models]).contiguous())
        self.head_bias = nn.Parameter(torch.stack([m.head.bias.detach() for m in models]).unsqueeze(1))
        ids, weights = packed_bags(pool_tokens.long())
        self.register_buffer("pool_ids", ids, persistent=False)
        self.register_buffer("pool_weights", weights, persistent=False)
        self.register_buffer("pool_labels", pool_labels.long(), persistent=False)

    @property
    def n_models(self) -> int:
        return self.head_weight.shape[0]

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Packed bags, word ids and weights [K, B, w] (model k reads row k) -> logits [K, B, C]."""
        table = self.head_weight if self.embedding is None else self.embedding
        k, vocab, width = table.shape
        summed = BagSum.apply(table.view(k * vocab, width), _offset(ids, k, vocab), weights.flatten(0, 1)).view(k, -1, width)
        return summed + self.head_bias if self.embedding is None else torch.baddbmm(self.head_bias, summed, self.head_weight)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``batch`` [K, B] pool ids; loss = sum over models of each model's mean cross-entropy."""
        logits = self(self.pool_ids[batch], self.pool_weights[batch])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in float32 at least (mixed precision), float64 kept
        per_sample = F.cross_entropy(logits.flatten(0, 1), self.pool_labels[batch].flatten(), reduction="none")
        loss = per_sample.view(batch.shape).mean(dim=1).sum()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Logits [K, b, 1, C] in float32 of every model on pool ids ``batch`` (the export format per model)."""
        shape = (self.n_models, *batch.shape, self.pool_ids.shape[1])
        return self(self.pool_ids[batch].expand(shape), self.pool_weights[batch].expand(shape)).float().unsqueeze(2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.hparams)

    def unstack(self) -> list[BagOfWordsClassifier]:
        """K single models carrying the trained weights in the ensemble's dtype (checkpoints identical in format to the sequential farm)."""
        models = []
        for k in range(self.n_models):
            model = self.model_class(**self.hparams).to(self.head_weight.dtype)
            with torch.no_grad():
                if self.embedding is not None:
                    model.embedding.weight.copy_(self.embedding[k].t())
                model.head.weight.copy_(self.head_weight[k].t())
                model.head.bias.copy_(self.head_bias[k, 0])
            models.append(model.eval())
        return models


class DPBagEnsemble(PrivateHeadSteps, VectorisedBag):
    """``VectorisedBag`` of linear classifiers (``embedding_dim: 0``) whose training steps are DP-SGD steps on the unit-norm bags; a batch is padded pool ids [K, B]."""

    def __init__(self, models: list[BagOfWordsClassifier], pool_tokens: torch.Tensor, pool_labels: torch.Tensor, privacy: EnsemblePrivacy) -> None:
        super().__init__(models, pool_tokens, pool_labels)
        if self.embedding is not None:
            raise MiaError("DP-SGD on the vectorised farm trains the linear bag-of-words classifier (model.init_args.embedding_dim: 0); "
                           "use farm.engine: sequential")
        self.private_init(privacy)

    def head_inputs(self, ids: torch.Tensor) -> tuple[BagInputs, torch.Tensor]:
        """The bags of pool ids [K, B] (sparse) and the classifiers' logits."""
        words, weights = self.pool_ids[ids], self.pool_weights[ids]
        return BagInputs(words, weights, self.head_weight.shape[1]), self(words, weights)

    def head_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.head_weight, self.head_bias
