"""K LSTM text classifiers trained at once: stacked weights, one time-step loop for all models.

Model k's embedding is ``embedding[k]`` [V, E], its layer-l (direction d) weights ``w_ih[k]`` [in, 4H],
``w_hh[k]`` [H, 4H] and biases, its head ``head_weight[k]`` [H x directions, C]. A batch of token ids
[K, B, T] (model k's own minibatch) is looked up in the K embeddings at once, every layer's input
projection over all T x B tokens is one ``torch.baddbmm``, and the recurrence is
``mia_lightning.models.stacked_lstm`` (one batched matmul per time step for all K models, backward
by hand). Dropout (embedding, between layers, before the head) draws its masks per model and sample
from torch's generator: the same distribution as the single model, not the same draws, so only
dropout-free recipes repeat the sequential farm's updates (to float tolerance: the matmuls sum in a
different order than ``nn.LSTM``'s kernel).

Adam, AdamW and SGD act elementwise, so one optimiser over the stacked parameters is K independent
optimisers; the loss is the sum of each model's mean cross-entropy, so each model gets exactly its
own gradient. Defences that need more than a loss (adversarial regularisation's second optimiser,
DP-SGD's per-sample clipping) are refused: they train with ``farm.engine: sequential``.
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from mia_lightning.models.ensemble import PerModelClipping
from mia_lightning.models.lstm import LSTMClassifier, make_optimizer
from mia_lightning.models.stacked_lstm import stacked_lstm


def _stack(tensors: list[torch.Tensor], transpose: bool = False) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach().t() if transpose else t.detach() for t in tensors]).contiguous())


def _lstm_names(model: LSTMClassifier) -> list[str]:
    """Suffixes of ``nn.LSTM``'s per-layer, per-direction parameters in layer order: ``l0``, ``l0_reverse``, ``l1``, ..."""
    directions = ("", "_reverse") if model.hparams.bidirectional else ("",)
    return [f"l{layer}{suffix}" for layer in range(model.hparams.num_layers) for suffix in directions]


def unstackable_args(args: Mapping[str, Any]) -> str | None:
    """Why an ``LSTMClassifier`` with these init arguments cannot join an ensemble (None when it can; missing keys take the class defaults)."""
    lstm, adv_reg = args.get("lstm", "torch"), args.get("adv_reg", 0.0)
    if lstm != "torch":
        return f"model.init_args.lstm {lstm!r} (DP-SGD's per-sample-gradient LSTM)"
    if adv_reg > 0:
        return "model.init_args.adv_reg > 0 (adversarial regularisation trains a second model with its own optimiser)"
    return None


def stackable(models: list[LSTMClassifier]) -> str | None:
    """Why these models cannot train as one ensemble (None when they can)."""
    hp = models[0].hparams
    if any(dict(model.hparams) != dict(hp) for model in models):
        return "the models' hyper-parameters differ"
    return unstackable_args(hp)


class VectorisedLSTM(PerModelClipping, L.LightningModule):
    """An ensemble of K ``LSTMClassifier``s (``lstm: torch``, no adversarial regularisation) with identical hyper-parameters.

    ``pool_tokens`` [n, T] / ``pool_labels`` [n] hold the whole pool (buffers, so batches are gathered
    on the module's device); a training batch is an index tensor [K, B] (model k's minibatch of pool
    ids), a predict batch a tensor of pool ids [b] that every model reads.
    """

    def __init__(self, models: list[LSTMClassifier], pool_tokens: torch.Tensor, pool_labels: torch.Tensor) -> None:
        super().__init__()
        reason = stackable(models)
        if reason:
            raise ValueError(f"VectorisedLSTM cannot stack these models: {reason}")
        self.hparams.update(models[0].hparams)
        self.model_class = type(models[0])
        self.names = _lstm_names(models[0])
        self.embedding = _stack([m.embedding.weight for m in models])
        lstms = [m.lstm for m in models]
        self.w_ih = nn.ParameterList(_stack([getattr(l, f"weight_ih_{n}") for l in lstms], transpose=True) for n in self.names)
        self.w_hh = nn.ParameterList(_stack([getattr(l, f"weight_hh_{n}") for l in lstms], transpose=True) for n in self.names)
        self.b_ih = nn.ParameterList(_stack([getattr(l, f"bias_ih_{n}").unsqueeze(0) for l in lstms]) for n in self.names)
        self.b_hh = nn.ParameterList(_stack([getattr(l, f"bias_hh_{n}").unsqueeze(0) for l in lstms]) for n in self.names)
        self.head_weight = _stack([m.head.weight for m in models], transpose=True)
        self.head_bias = _stack([m.head.bias.unsqueeze(0) for m in models])
        self.register_buffer("pool_tokens", pool_tokens.long(), persistent=False)
        self.register_buffer("pool_labels", pool_labels.long(), persistent=False)

    @property
    def n_models(self) -> int:
        return self.embedding.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [K, B, T] (model k reads row k) -> logits [K, B, C]."""
        hp, k = self.hparams, self.n_models
        vocab, width = self.embedding.shape[1:]
        offsets = torch.arange(k, device=tokens.device).view(k, 1, 1) * vocab
        x = F.embedding(tokens.transpose(1, 2) + offsets, self.embedding.view(k * vocab, width))  # [K, T, B, E]
        x = F.dropout(x, hp.dropout, self.training)
        directions = 2 if hp.bidirectional else 1
        steps, batch = x.shape[1:3]
        for layer in range(hp.num_layers):
            outputs, finals = [], []
            for direction in range(directions):
                i = layer * directions + direction
                sequence = x if direction == 0 else x.flip(1)
                xp = torch.baddbmm(self.b_ih[i] + self.b_hh[i], sequence.reshape(k, steps * batch, -1), self.w_ih[i])
                states = stacked_lstm(xp.view(k, steps, batch, -1), self.w_hh[i])
                finals.append(states[:, -1])
                outputs.append(states if direction == 0 else states.flip(1))
            x = torch.cat(outputs, dim=-1)
            if layer < hp.num_layers - 1:
                x = F.dropout(x, hp.dropout, self.training)
        final = F.dropout(torch.cat(finals, dim=-1), hp.dropout, self.training)
        return torch.baddbmm(self.head_bias, final, self.head_weight)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """``batch`` [K, B] pool ids; loss = sum over models of each model's mean (label-smoothed) cross-entropy."""
        logits = self(self.pool_tokens[batch])
        per_sample = F.cross_entropy(logits.flatten(0, 1), self.pool_labels[batch].flatten(), reduction="none", label_smoothing=self.hparams.label_smoothing)
        loss = per_sample.view(batch.shape).mean(dim=1).sum()
        self.log("train_loss", loss / self.n_models, prog_bar=True)
        return loss

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Logits [K, b, 1, C] in float32 of every model on pool ids ``batch`` (the export format per model)."""
        tokens = self.pool_tokens[batch].unsqueeze(0).expand(self.n_models, -1, -1)
        return self(tokens).float().unsqueeze(2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.hparams)

    def unstack(self) -> list[LSTMClassifier]:
        """K single models carrying the trained weights (checkpoints identical in format to the sequential farm)."""
        models = []
        for k in range(self.n_models):
            model = self.model_class(**self.hparams)
            with torch.no_grad():
                model.embedding.weight.copy_(self.embedding[k])
                for i, name in enumerate(self.names):
                    getattr(model.lstm, f"weight_ih_{name}").copy_(self.w_ih[i][k].t())
                    getattr(model.lstm, f"weight_hh_{name}").copy_(self.w_hh[i][k].t())
                    getattr(model.lstm, f"bias_ih_{name}").copy_(self.b_ih[i][k, 0])
                    getattr(model.lstm, f"bias_hh_{name}").copy_(self.b_hh[i][k, 0])
                model.head.weight.copy_(self.head_weight[k].t())
                model.head.bias.copy_(self.head_bias[k, 0])
            models.append(model.eval())
        return models
