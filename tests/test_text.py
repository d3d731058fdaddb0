"""Text workload: cleaning and the duplicate-text guard, vocabulary and encoding by hand, the DataModule, the LSTM, a farm end to end, bad input."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from mia_lightning.cli import train_main
from mia_lightning.data import text as text_data
from mia_lightning.data.text import TextDataModule, build_vocabulary, clean_text, deduplicate, encode, load_texts, tokenize
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.models.lstm import LSTMClassifier

FILLER = "the movie was a story with actors and scenes that i saw on film last week".split()


def write_reviews(path: Path, n: int = 120, seed: int = 0, extra_rows: list[tuple[str, str]] = ()) -> Path:
    """A CSV of generated reviews whose label is carried by one sentiment word among filler words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(FILLER, 12)) + [("great" if label else "awful"), f"id{i}"]
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([*rows, *extra_rows])
    return path


@pytest.fixture(autouse=True)
def fresh_caches():
    load_texts.cache_clear()
    text_data.encoded_pool.cache_clear()
    yield


def test_cleaning_strips_breaks_and_the_duplicate_guard_runs_before_any_split(tmp_path):
    assert clean_text("Great film.<br /><br />Loved  it<BR/>!") == "Great film. Loved it !"
    texts, labels, dropped = deduplicate(["a", "b", "a", "c", "c"], ["1", "0", "1", "1", "0"])
    assert (texts, labels, dropped) == (["a", "b"], ["1", "0"], 3)  # repeat of a dropped; c's copies disagree: both dropped
    source = write_reviews(tmp_path / "r.csv", n=20, extra_rows=[("the movie <br />was great", "pos"), ("the movie was  great", "pos")])
    pool = load_texts(str(source))
    assert len(pool.texts) == 21 and len(set(pool.texts)) == 21  # 22 rows, two identical once cleaned
    dm = TextDataModule(source=str(source), vocab_size=50, max_len=8)
    assert len(dm.pool.texts) == 21


def test_vocabulary_and_encoding_by_hand():
    tokens = [tokenize("Bad, bad movie!"), tokenize("good movie")]
    assert tokens[0] == ["bad", ",", "bad", "movie", "!"]
    vocabulary = build_vocabulary(tokens, vocab_size=5)
    assert vocabulary == {"bad": 2, "movie": 3, "!": 4}  # counts 2, 2, then ties alphabetical: "!" < "," < "good"
    ids = encode(tokens, vocabulary, max_len=4)
    assert ids.tolist() == [[2, 1, 2, 3], [0, 0, 1, 3]]  # first 4 tokens; front padding; unknown = 1
    assert encode(tokens, vocabulary, max_len=4, truncate="last").tolist()[0] == [1, 2, 3, 4]


def test_datamodule_protocol(tmp_path):
    source = write_reviews(tmp_path / "r.csv", n=100)
    dm = TextDataModule(source=str(source), vocab_size=40, max_len=16, batch_size=8, train_indices=list(range(0, 100, 2)), seed=3)
    assert dm.model_kwargs() == {"vocab_size": 40, "n_classes": 2}
    assert dm.pool_labels().tolist() == [i % 2 for i in range(100)]  # neg < pos: neg -> 0
    predicted = torch.cat([batch[0] for batch in dm.predict_dataloader()])
    assert torch.equal(predicted, torch.from_numpy(dm.tokens))  # the whole pool in pool order
    trained_rows = {tuple(row) for batch in dm.train_dataloader() for row in batch[0].tolist()}
    assert trained_rows <= {tuple(row) for row in dm.tokens[0::2].tolist()}
    held = TextDataModule(source=str(source), vocab_size=40, max_len=16, train_indices=list(range(50)), val_split="held_out", val_size=10)
    assert held.val_indices.size == 10 and held.val_indices.min() >= 50
    own = TextDataModule(source=str(source), vocab_size=40, max_len=16, train_indices=list(range(50)), val_split="train", val_fraction=0.2)
    assert own.val_indices.size == 10 and set(own.train_indices) | set(own.val_indices) == set(range(50))
    assert not set(own.train_indices) & set(own.val_indices)
    edited = write_reviews(tmp_path / "edited.csv", n=100)
    edited.write_text(edited.read_text().replace("great", "grand", 1))
    assert TextDataModule(source=str(edited), vocab_size=40, max_len=16).fingerprint() != dm.fingerprint()


def test_subsample_is_seeded_and_reference_texts_lie_outside_the_pool(tmp_path):
    source = write_reviews(tmp_path / "r.csv", n=100)
    a = TextDataModule(source=str(source), n_rows=40, subsample_seed=1, vocab_size=40, max_len=16, n_reference=30)
    b = TextDataModule(source=str(source), n_rows=40, subsample_seed=1, vocab_size=40, max_len=16)
    assert a.pool.texts == b.pool.texts and len(a.pool.texts) == 40
    pool_rows = {tuple(r) for r in a.tokens.tolist()}
    assert a.reference_tokens.shape == (30, 16) and not pool_rows & {tuple(r) for r in a.reference_tokens.tolist()}
    with pytest.raises(MiaError, match="only 60 texts"):
        TextDataModule(source=str(source), n_rows=40, vocab_size=40, max_len=16, n_reference=61)


def test_pang_lee_snippets_are_parsed(tmp_path, monkeypatch):
    body = "1\t2.2\tA fine film.\r\n2\t0.0\tNeutral.\r\n3\t-1.5\tA dull one.\r\n"
    archive = tmp_path / "hutto.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = body.encode()
        info = tarfile.TarInfo(text_data.PANG_LEE_MEMBER)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(text_data, "registry_file", lambda spec: archive)
    pool = load_texts("pang_lee")
    assert pool.texts == ("A fine film.", "A dull one.") and pool.class_names == ("negative", "positive") and pool.labels.tolist() == [1, 0]


@pytest.mark.parametrize("lstm", ["torch", "opacus"])
def test_lstm_learns_the_sentiment_word_and_exports_b_1_c(tmp_path, lstm):
    source = write_reviews(tmp_path / "r.csv", n=120)
    dm = TextDataModule(source=str(source), vocab_size=40, max_len=16, batch_size=16)
    torch.manual_seed(0)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=16, hidden_size=16, lstm=lstm, lr=0.02)
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    logits = torch.cat(trainer.predict(model, datamodule=dm))
    assert logits.shape == (120, 1, 2) and logits.dtype == torch.float32
    accuracy = (logits[:, 0].argmax(-1).numpy() == dm.pool_labels()).mean()
    assert accuracy > 0.9


def test_adversarial_regularisation_trains_the_inference_model(tmp_path):
    source = write_reviews(tmp_path / "r.csv", n=120)
    dm = TextDataModule(source=str(source), n_rows=60, vocab_size=40, max_len=16, batch_size=10, n_reference=40)
    torch.manual_seed(0)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=8, hidden_size=8, adv_reg=2.0)
    before = [p.detach().clone() for p in model.adversary.parameters()]
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert "adversary_loss" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, model.adversary.parameters()))
    with pytest.raises(ValueError, match="n_reference"):
        no_reference = LSTMClassifier(**dm.model_kwargs(), embedding_dim=8, hidden_size=8, adv_reg=2.0)
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
            no_reference, datamodule=TextDataModule(source=str(source), n_rows=60, vocab_size=40, max_len=16, batch_size=10))


def write_recipe(source: Path, root: Path, **data_overrides) -> Path:
    recipe = {
        "experiment": {"name": "tiny_text", "root": str(root)},
        "plan": {"n_models": 4, "seed": 0},
        "data": {"class_path": "mia_lightning.data.text.TextDataModule",
                 "init_args": {"source": str(source), "vocab_size": 40, "max_len": 16, "batch_size": 16, **data_overrides}},
        "model": {"class_path": "mia_lightning.models.lstm.LSTMClassifier", "init_args": {"embedding_dim": 8, "hidden_size": 8, "lr": 0.02}},
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val_loss", "patience": 1}}]},
        "farm": {"engine": "sequential"},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_farm_with_early_stopping_writes_a_logit_experiment(tmp_path):
    source = write_reviews(tmp_path / "r.csv", n=80)
    recipe = write_recipe(source, tmp_path / "run", val_split="held_out", val_size=20)
    assert train_main(["farm", "--config", str(recipe)]) == 0
    experiment = ExperimentDir(tmp_path / "run" / "tiny_text")
    logits = np.load(experiment.model_dir(0) / "logits.npy")
    assert logits.shape == (80, 1, 2) and experiment.keep.shape == (4, 80)
    assert experiment.plan["dataset"] == f"text:{source}"


@pytest.mark.parametrize(
    "content, overrides, fragment",
    [
        ("review,label\nfine,pos\nbad,neg\n", {}, "no column 'text' in header ['review', 'label']; set data.init_args.text_column to one of them"),
        ("text,label\nfine,pos\n<br />  ,neg\nbad,neg\n", {}, "1 empty texts"),
        ("text,label\nfine,pos\nbad,pos\nmeh,pos\n", {}, "single value"),
        ("text,label\nfine,pos\nbad,neg\nmeh,pos\n", {"vocab_size": 0}, "vocab_size 0"),
    ],
)
def test_bad_input_fails_the_farm_in_one_line_and_writes_nothing(tmp_path, capsys, content, overrides, fragment):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    recipe = write_recipe(bad, tmp_path / "run", **overrides)
    assert train_main(["farm", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.strip().count("\n") == 0
    assert not (tmp_path / "run" / "tiny_text").exists()


def test_unreachable_dp_budget_fails_the_farm_before_anything_is_written(tmp_path, capsys):
    source = write_reviews(tmp_path / "r.csv", n=80)
    recipe_path = write_recipe(source, tmp_path / "run")
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"]["init_args"]["lstm"] = "opacus"
    recipe["trainer"]["callbacks"] = [{"class_path": "mia_lightning.defences.dp_sgd.DPSGD", "init_args": {"target_epsilon": 1e-9}}]
    recipe_path.write_text(yaml.safe_dump(recipe))
    assert train_main(["farm", "--config", str(recipe_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "run" / "tiny_text").exists()


@pytest.mark.parametrize("sizes", [{"hidden_size": 0}, {"embedding_dim": 0}, {"num_layers": 0}])
def test_zero_sized_lstm_is_refused(sizes):
    """A zero-width LSTM would train to a constant with only a torch warning."""
    with pytest.raises(ValueError, match="must each be >= 1"):
        LSTMClassifier(vocab_size=50, **sizes)


def test_bf16_mixed_trains_the_lstm_on_any_cpu():
    """On a CPU without native bfloat16 oneDNN's LSTM raised under bf16-mixed (a traceback from `train.py farm`);
    there the LSTM layers now run in float32 and the rest in bfloat16. The result stays a bfloat16-accurate copy of float32."""
    torch.manual_seed(0)
    model = LSTMClassifier(vocab_size=50, embedding_dim=8, hidden_size=8)
    tokens = torch.randint(0, 50, (4, 12))
    reference = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert torch.allclose(logits.float(), reference, atol=0.05), (logits, reference)
