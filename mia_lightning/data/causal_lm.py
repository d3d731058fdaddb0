"""Texts grouped by user for causal language models: the masked-LM pool and plan, a causal tokenizer, zlib sizes.

``CausalTextDataModule`` is ``MLMTextDataModule`` (the same sources, cleaning, user groups, public
text for reference models and seeded batches) with a tokenizer for next-token prediction:

- ``pool``: a byte-level BPE (GPT-2's algorithm: UTF-8 bytes, merges learned here) with
  ``vocab_size`` tokens trained on the pool and public texts, which prepends ``<|endoftext|>`` to
  each text as GPT-2's BOS so the first word is scored too. No GPT-2 tokenizer ships in a package
  this project can read offline, so offline recipes train models from scratch with this one;
- the model's own tokenizer (a hub name or folder, e.g. ``gpt2``, for users with network), loaded
  under the project's trust rules; a tokenizer without a padding token pads with its EOS token
  (padding is masked out).

Its predict batches also carry ``zlib_bytes``: the length of ``zlib.compress`` of the UTF-8 text that
the (possibly truncated) token ids decode to, the denominator of the zlib ratio.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mia_lightning.data.mlm import MLMTextDataModule, PadCollate, TokenizedTexts
from mia_lightning.errors import MiaError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS = "<|endoftext|>"
PAD = "<|pad|>"


@lru_cache(maxsize=2)
def _byte_level_bpe(texts: tuple[str, ...], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, pad_token=PAD)


def byte_level_bpe(texts: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerBase:
    """A GPT-2-style byte-level BPE tokenizer with ``vocab_size`` tokens learned on ``texts`` (BOS prepended to every text); cached per corpus."""
    if vocab_size < 258:
        raise MiaError(f"data.init_args.vocab_size {vocab_size}: a byte-level BPE needs at least 258 tokens (256 bytes and 2 special tokens)")
    return _byte_level_bpe(tuple(texts), int(vocab_size))


def load_causal_tokenizer(spec: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``spec`` (``pool``: ``byte_level_bpe`` on ``texts``), with a padding token."""
    if spec == "pool":
        return byte_level_bpe(texts, vocab_size)
    from transformers import AutoTokenizer

    from mia_lightning.hub import from_pretrained
    from mia_lightning.models.mlm import pretrained_location, quiet_transformers

    quiet_transformers()
    try:
        tokenizer = from_pretrained(AutoTokenizer, pretrained_location(spec, "data.init_args.tokenizer"), "data.init_args.tokenizer")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MiaError(f"data.init_args.tokenizer {spec!r}: cannot load a tokenizer ({' '.join(str(err).split())[:120]}); give the model's hub name or folder, or pool") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise MiaError(f"data.init_args.tokenizer {spec!r}: neither a padding nor an end-of-text token; it is not a causal-LM tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class ZlibCollate(PadCollate):
    """``PadCollate``'s batches plus ``zlib_bytes`` float32 [b]: each text's zlib size, looked up by its pool index."""

    def __init__(self, pad_token_id: int, zlib_bytes: np.ndarray) -> None:
        super().__init__(pad_token_id)
        self.zlib_bytes = zlib_bytes

    def __call__(self, items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        batch["zlib_bytes"] = torch.from_numpy(self.zlib_bytes[batch["index"].numpy()])
        return batch


class CausalTextDataModule(MLMTextDataModule):
    """Texts with user ids for ``CausalLM`` (see the module docstring); ``vocab_size`` sizes the ``pool`` tokenizer."""

    def __init__(self, *args: Any, vocab_size: int = 4096, **kwargs: Any) -> None:
        self._vocab_size = int(vocab_size)
        super().__init__(*args, **kwargs)
        short = [i for i, ids in enumerate(self.pool_tokens) if len(ids) < 2]
        if short:
            raise MiaError(f"data source {self.hparams.source!r}: text {short[0]} has {len(self.pool_tokens[short[0]])} token, a causal LM scores none of it; remove texts that short (min_words)")
        decoded = self.tokenizer.batch_decode([ids.tolist() for ids in self.pool_tokens], skip_special_tokens=True)
        self.zlib_bytes = np.array([len(zlib.compress(text.encode("utf-8"))) for text in decoded], dtype=np.float32)

    def load_tokenizer(self, spec: str, texts: list[str]) -> PreTrainedTokenizerBase:
        return load_causal_tokenizer(spec, texts, self._vocab_size)

    @property
    def dataset_id(self) -> str:
        return f"lm:{self.hparams.source}"

    def model_kwargs(self) -> dict[str, Any]:
        """Vocabulary size, special token ids and the longest sequence for ``CausalLM``."""
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return {"vocab_size": len(tok), "pad_token_id": int(tok.pad_token_id), "bos_token_id": int(bos), "eos_token_id": int(tok.eos_token_id),
                "max_length": int(self.hparams.max_length)}

    def predict_dataloader(self) -> DataLoader:
        """The whole pool in pool order, with each text's zlib size."""
        collate = ZlibCollate(int(self.tokenizer.pad_token_id), self.zlib_bytes)
        return DataLoader(TokenizedTexts(self.pool_tokens), collate_fn=collate, batch_size=self.hparams.predict_batch_size, shuffle=False, num_workers=self.hparams.num_workers)
