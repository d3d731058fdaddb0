"""Causal language models (any ``AutoModelForCausalLM``) that export the LLM membership signals of each text.

``CausalLM`` wraps a Hugging Face causal LM (a hub name or a local folder, loaded under the
project's trust rules by ``mia_lightning.hub.from_pretrained``; or a small ``GPT2Config`` trained
from scratch), trains it with the next-token objective, and in ``predict_step`` exports one row of
``len(SIGNALS)`` columns per text (higher = more member-like), in this order:

- ``loss``: minus the mean next-token loss, (1/T) sum_t log p(x_t | x_<t) over the T scored tokens
  (Yeom et al., CSF 2018; the statistic of the reference-model attack and of LiRA / RMIA on LMs);
- ``zlib_ratio``: that value divided by the zlib entropy of the text, the length in bytes of
  ``zlib.compress(text.encode("utf-8"))`` (Carlini et al., "Extracting Training Data from Large
  Language Models", USENIX Security 2021: log-perplexity / zlib entropy, low = memorised);
- ``min_k``: the mean of the k% lowest token log-probabilities (Shi et al., "Detecting Pretraining
  Data from Large Language Models", ICLR 2024);
- ``min_k_plus_plus``: the mean of the k% lowest normalised token scores
  (log p(x_t | x_<t) - mu_t) / sigma_t, where mu_t and sigma_t^2 are the mean and variance of
  log p(z | x_<t) for z drawn from the model's own next-token distribution (Zhang et al., "Min-K%++:
  Improved Baseline for Detecting Pre-Training Data from Large Language Models", 2024).

Scored tokens: every position t >= 1 of the text's token ids (the first token has no context; the
``pool`` tokenizer of ``data.causal_lm`` prepends a BOS token so every word is scored). k% of T
tokens is ``max(1, floor(k T))`` tokens. The experiment records the column names in ``plan.json``
(``signals``); the first column is the one generic signal attacks (LiRA, RMIA, the reference ratio) read.
"""

from __future__ import annotations

import lightning as L
import torch
import torchmetrics
from torch import nn

from mia_lightning.errors import MiaError
from mia_lightning.hub import from_pretrained
from mia_lightning.models.mlm import pretrained_location, quiet_transformers

SIGNALS: tuple[str, ...] = ("loss", "zlib_ratio", "min_k", "min_k_plus_plus")
"""The columns of a causal LM's ``signal.npy``, in order."""


def load_causal_lm(pretrained: str | None, config: dict | None, vocab_size: int, special: dict[str, int], max_length: int | None) -> nn.Module:
    """An ``AutoModelForCausalLM``: from ``pretrained`` (its vocabulary must cover the tokenizer's), or a ``GPT2Config(**config)`` from scratch.

    A config without ``n_positions`` gets the data's ``max_length``; a smaller one is refused (longer texts would index past it).
    """
    from transformers import AutoModelForCausalLM, GPT2Config

    quiet_transformers()
    if pretrained is None:
        settings = {"vocab_size": vocab_size, **({"n_positions": max_length} if max_length else {}), **special, **(config or {})}
        if max_length and settings["n_positions"] < max_length:
            raise ValueError(f"config.n_positions {settings['n_positions']} is below the data's max_length {max_length}; raise it or lower data.init_args.max_length")
        return AutoModelForCausalLM.from_config(GPT2Config(**settings))
    try:
        model = from_pretrained(AutoModelForCausalLM, pretrained_location(pretrained), "model.pretrained")
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:160]
        raise MiaError(f"model.pretrained {pretrained!r}: not a loadable causal language model ({reason}); give a hub name or a folder of an AutoModelForCausalLM (config.json + weights)") from None
    if model.get_output_embeddings() is None:
        raise MiaError(f"model.pretrained {pretrained!r}: {type(model).__name__} has no language-model head; use a model saved with its LM head")
    if model.config.vocab_size < vocab_size:
        raise MiaError(
            f"model.pretrained {pretrained!r}: its vocabulary has {model.config.vocab_size} tokens but the data's tokenizer has {vocab_size}; "
            "set data.init_args.tokenizer to the model's own tokenizer (the same source)"
        )
    return model


def next_token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax float32 [b, L-1, V] of the predictions for positions 1..L-1, log p(x_t | x_<t) [b, L-1])."""
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    return log_probs, log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]


def scored_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [b, L-1]: positions t >= 1 that are real tokens (their context, x_<t, is then real too under right padding)."""
    return attention_mask[:, 1:].bool()


def lowest_mean(values: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """[b]: mean of the ``max(1, floor(fraction * T_i))`` smallest valid values of each row (T_i valid values)."""
    counts = valid.sum(dim=1)
    k = torch.clamp(torch.floor(fraction * counts.double()).long(), min=1)
    ordered = values.masked_fill(~valid, float("inf")).sort(dim=1).values
    taken = torch.arange(values.shape[1], device=values.device)[None, :] < k[:, None]
    return torch.where(taken, ordered, torch.zeros_like(ordered)).sum(dim=1) / k


def text_signals(log_probs: torch.Tensor, token_log_p: torch.Tensor, valid: torch.Tensor, zlib_bytes: torch.Tensor, fraction: float) -> torch.Tensor:
    """float32 [b, 4] in ``SIGNALS`` order from the next-token log-softmax [b, T, V], the tokens' log-probabilities [b, T] and ``valid`` [b, T]."""
    probs = log_probs.exp()
    mu = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)
    spread = torch.where(probs > 0, probs * (log_probs - mu[..., None]).square(), torch.zeros_like(probs)).sum(dim=-1)  # centred: no cancellation
    sigma = spread.clamp_min(1e-12).sqrt()
    mean = torch.where(valid, token_log_p, torch.zeros_like(token_log_p)).sum(dim=1) / valid.sum(dim=1)
    normalised = (token_log_p - mu) / sigma
    columns = [mean, mean / zlib_bytes.to(mean.dtype), lowest_mean(token_log_p, valid, fraction), lowest_mean(normalised, valid, fraction)]
    return torch.stack(columns, dim=1).float()


class CausalLM(L.LightningModule):
    """A causal language model trained with the next-token objective; ``predict_step`` exports ``SIGNALS`` [b, 4] per text.

    ``vocab_size`` and the special token ids come from the data (its tokenizer) through
    ``model_kwargs``, with the data's ``max_length``. ``config`` builds a ``GPT2Config`` (e.g. ``{n_layer: 2, n_embd: 128, n_head: 4,
    n_positions: 256}``) when ``pretrained`` is not given. ``score_chunk`` texts go through the
    vocabulary statistics of Min-K%++ at a time (a [chunk, L, V] float32 array).
    """

    NAME_ARGS = {"pretrained": ()}
    """Arguments that name a model to load (checked by ``mia_lightning.names`` when a file names this class)."""

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        vocab_size: int = 50257,
        pad_token_id: int = 50256,
        bos_token_id: int = 50256,
        eos_token_id: int = 50256,
        max_length: int | None = None,
        min_k: float = 0.2,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        score_chunk: int = 16,
    ) -> None:
        super().__init__()
        if not 0.0 < min_k <= 1.0:
            raise ValueError(f"min_k {min_k}: the fraction of lowest-scored tokens must lie in (0, 1]")
        if score_chunk < 1:
            raise ValueError(f"score_chunk {score_chunk}: must be at least 1")
        self.save_hyperparameters()
        special = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
        self.net = load_causal_lm(pretrained, config, vocab_size, special, max_length).train()  # from_pretrained returns eval mode (no dropout)
        self.val_loss = torchmetrics.MeanMetric()

    @property
    def signal_layout(self) -> dict:
        """What ``signal.npy``'s columns are (written to ``plan.json`` ``signals`` by the farm)."""
        return {"columns": list(SIGNALS), "min_k": self.hparams.min_k}

    def token_log_probs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(next-token log-softmax [b, L-1, V], log p(x_t | x_<t) [b, L-1], scored positions [b, L-1]) of a batch."""
        logits = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_probs, token_log_p = next_token_log_probs(logits, batch["input_ids"])
        return log_probs, token_log_p, scored_tokens(batch["attention_mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, token_log_p, valid = self.token_log_probs(batch)
        loss = -token_log_p[valid].mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=valid.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Held-out mean next-token loss (utility of the model; perplexity = exp of it)."""
        _, token_log_p, valid = self.token_log_probs(batch)
        self.val_loss.update(-token_log_p[valid])
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Signals float32 [b, 4] in ``SIGNALS`` order; the batch must carry ``zlib_bytes`` (``CausalTextDataModule``'s predict loader)."""
        if "zlib_bytes" not in batch:
            raise MiaError("CausalLM predicts from batches with zlib_bytes; use mia_lightning.data.causal_lm.CausalTextDataModule as the data")
        rows = []
        chunk = self.hparams.score_chunk
        for start in range(0, batch["input_ids"].shape[0], chunk):
            part = {key: value[start : start + chunk] for key, value in batch.items()}
            log_probs, token_log_p, valid = self.token_log_probs(part)
            rows.append(text_signals(log_probs, token_log_p, valid, part["zlib_bytes"], self.hparams.min_k))
        return torch.cat(rows)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
