"""LSTM text classifier: Embedding -> LSTM layers -> dropout -> Linear, with the defences as arguments.

``lstm="opacus"`` builds the recurrent layers from opacus' ``DPLSTM`` (the same LSTM equations from
per-sample-gradient-capable linear layers): required under DP-SGD, since opacus rejects ``nn.LSTM``
and wrapping it by hand silently yields no per-sample gradients. ``lstm="torch"`` uses ``nn.LSTM``
(several times faster on the CPU) for every other setting. Sequences are padded at the front (see
``mia_lightning.data.text``), so the final hidden state has read the last real token.

Defences as arguments: ``weight_decay`` (L2, added to the gradient by the optimiser), ``dropout``
(embedding, between LSTM layers and before the head), ``label_smoothing`` (of the cross-entropy) and
``adv_reg`` (lambda of Nasr et al.'s adversarial regularisation, ``mia_lightning.defences.adversarial``;
it needs reference texts: ``data.init_args.n_reference``).

Under ``bf16-mixed`` on a CPU whose ``nn.LSTM`` kernel (oneDNN) has no bfloat16 form (no native
bfloat16 arithmetic: it raises), the LSTM layers run in float32 and the rest in bfloat16, as autocast
does for the operations it keeps in float32 (``cpu_bfloat16_lstm``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterable

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from mia_lightning.defences.adversarial import InferenceModel, inference_loss, privacy_penalty
from mia_lightning.defences.dp_sgd import PrivacyStateMixin
from mia_lightning.models import tabular_mlp
from mia_lightning.models.tabular_mlp import OPTIMIZERS

LSTM_IMPLEMENTATIONS = ("torch", "opacus")
log = logging.getLogger("mia_lightning")


@functools.cache
def cpu_bfloat16_lstm() -> bool:
    """Whether ``nn.LSTM`` trains under CPU bfloat16 autocast here (probed once: oneDNN refuses it on CPUs without native bfloat16)."""
    probe = nn.LSTM(4, 4, batch_first=True)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            probe(torch.zeros(1, 2, 4))[0].float().sum().backward()
    except RuntimeError:
        log.warning("this CPU has no bfloat16 nn.LSTM kernel: under bf16-mixed the LSTM layers run in float32, the rest in bfloat16")
        return False
    return True


def build_lstm(implementation: str, input_size: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool) -> nn.Module:
    """``nn.LSTM`` or opacus' ``DPLSTM`` with the same arguments (batch first)."""
    if implementation not in LSTM_IMPLEMENTATIONS:
        raise ValueError(f"lstm {implementation!r}: choose one of {', '.join(LSTM_IMPLEMENTATIONS)}")
    inter_layer = dropout if num_layers > 1 else 0.0
    if implementation == "opacus":
        from opacus.layers import DPLSTM

        return DPLSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True, dropout=inter_layer, bidirectional=bidirectional)
    return nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True, dropout=inter_layer, bidirectional=bidirectional)


def make_optimizer(parameters: Iterable[nn.Parameter], hparams: Any) -> torch.optim.Optimizer:
    """The text classifiers' optimiser from their hyper-parameters (LSTM and bag-of-words, single and vectorised): ``tabular_mlp.make_optimizer``
    with SGD's momentum fixed at 0.9 and torch's default kernels."""
    return tabular_mlp.make_optimizer(parameters, hparams.optimizer, hparams.lr, hparams.weight_decay, momentum=0.9, fused=None)


class LSTMClassifier(PrivacyStateMixin, L.LightningModule):
    """Text classifier on token ids [b, L] -> logits [b, C]; ``predict_step`` exports logits [b, 1, C]."""

    def __init__(
        self,
        vocab_size: int = 10000,
        n_classes: int = 2,
        embedding_dim: int = 64,
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        lstm: str = "torch",
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        adv_reg: float = 0.0,
        adv_reg_steps: int = 1,
        adv_reg_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"dropout {dropout} and label_smoothing {label_smoothing} must lie in [0, 1)")
        if adv_reg < 0 or adv_reg_steps < 1:
            raise ValueError(f"adv_reg {adv_reg} must be >= 0 and adv_reg_steps {adv_reg_steps} >= 1")
        if vocab_size < 3 or n_classes < 2:
            raise ValueError(f"vocab_size {vocab_size} must be >= 3 and n_classes {n_classes} >= 2")
        if min(embedding_dim, hidden_size, num_layers) < 1:
            raise ValueError(f"embedding_dim {embedding_dim}, hidden_size {hidden_size} and num_layers {num_layers} must each be >= 1")
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.lstm = build_lstm(lstm, embedding_dim, hidden_size, num_layers, dropout, bidirectional)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), n_classes)
        self.adversary = InferenceModel(n_classes) if adv_reg > 0 else None
        self.automatic_optimization = adv_reg == 0
        self.train_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [b, C] of token ids [b, L] (the final hidden state of the last layer, both directions when bidirectional)."""
        embedded = self.embedding_dropout(self.embedding(tokens))
        if embedded.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 \
                and isinstance(self.lstm, nn.LSTM) and not cpu_bfloat16_lstm():
            with torch.autocast("cpu", enabled=False):
                _, (h_n, _) = self.lstm(embedded.float())
        else:
            _, (h_n, _) = self.lstm(embedded)
        directions = 2 if self.hparams.bidirectional else 1
        final = torch.cat(list(h_n[-directions:]), dim=-1)
        return self.head(self.head_dropout(final))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training cross-entropy (with the label smoothing); validation reports the plain cross-entropy."""
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.adversary is not None:
            return self._adversarial_step(batch)
        tokens, labels = batch["members"] if isinstance(batch, dict) else batch
        logits = self(tokens)
        loss = self.loss(logits, labels)
        self.train_accuracy(logits, labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=labels.numel())
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=labels.numel())
        return loss

    def _adversarial_step(self, batch: Any) -> None:
        """Nasr et al.'s Algorithm 1 on one batch: ``adv_reg_steps`` inference-model steps, then one classifier step."""
        if not isinstance(batch, dict) or "reference" not in batch:
            raise ValueError("adv_reg needs reference texts from outside the pool: set data.init_args.n_reference")
        classifier_opt, adversary_opt = self.optimizers()
        (tokens, labels), (ref_tokens, ref_labels) = batch["members"], batch["reference"]
        for _ in range(self.hparams.adv_reg_steps):
            with torch.no_grad():
                member_logits, reference_logits = self(tokens), self(ref_tokens)
            gain_loss = inference_loss(self.adversary, member_logits, labels, reference_logits, ref_labels)
            adversary_opt.zero_grad()
            self.manual_backward(gain_loss)
            adversary_opt.step()
        logits = self(tokens)
        task_loss = self.loss(logits, labels)
        loss = task_loss + self.hparams.adv_reg * privacy_penalty(self.adversary, logits, labels)
        classifier_opt.zero_grad()
        self.manual_backward(loss)
        classifier_opt.step()
        self.adversary.zero_grad(set_to_none=True)  # the classifier step also reached h; h only learns in its own steps
        self.train_accuracy(logits, labels)
        self.log("train_loss", task_loss, prog_bar=True, batch_size=labels.numel())
        self.log("adversary_loss", gain_loss, batch_size=labels.numel())
        self.log("train_acc", self.train_accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=labels.numel())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        tokens, labels = batch
        logits = self(tokens)
        self.val_accuracy(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=labels.numel())
        self.log("val_acc", self.val_accuracy, prog_bar=True, batch_size=labels.numel())

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits [batch, n_queries=1, n_classes] in float32 (the export format)."""
        return self(batch[0]).float().unsqueeze(1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        classifier = [p for name, p in self.named_parameters() if not name.startswith("adversary.")]
        optimizer = make_optimizer(classifier, hp)
        if self.adversary is None:
            return optimizer
        return [optimizer, torch.optim.Adam(self.adversary.parameters(), lr=hp.adv_reg_lr)]
