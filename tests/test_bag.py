"""Bag-of-words text classifier: the features and the bag of embeddings by hand, learning, DP-SGD accounting against opacus, a farm end to end."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from mia_lightning.cli import train_main
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json
from mia_lightning.data import text as text_data
from mia_lightning.data.text import TextDataModule, load_texts
from mia_lightning.defences.dp_sgd import DPSGD
from mia_lightning.models.bag import BagOfWordsClassifier, bag_of_words
from test_text import write_reviews


@pytest.fixture(autouse=True)
def fresh_caches():
    load_texts.cache_clear()
    text_data.encoded_pool.cache_clear()
    yield


def quiet_trainer(callbacks: list, max_epochs: int) -> L.Trainer:
    return L.Trainer(callbacks=callbacks, max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu")


def accuracy(model: BagOfWordsClassifier, dm: TextDataModule, ids: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(dm.tokens[ids])).argmax(-1).numpy()
    return float((predicted == dm.pool_labels()[ids]).mean())


def test_bag_of_words_and_the_bag_of_embeddings_by_hand():
    tokens = torch.tensor([[0, 0, 2, 3, 2], [0, 0, 0, 0, 0], [4, 1, 1, 1, 1]])
    features = bag_of_words(tokens, vocab_size=5)
    k2 = 1 / np.sqrt(2)
    expected = [[0, 0, k2, k2, 0], [0, 0, 0, 0, 0], [0, k2, 0, 0, k2]]  # repeats count once, padding never, unknown (1) is a word
    torch.testing.assert_close(features, torch.tensor(expected, dtype=torch.float32))
    model = BagOfWordsClassifier(vocab_size=5, n_classes=3, embedding_dim=4)
    table = model.embedding.weight.detach().T  # [V, D]: row w is word w's embedding
    by_hand = torch.stack([(table[2] + table[3]) / np.sqrt(2), torch.zeros(4), (table[4] + table[1]) / np.sqrt(2)])
    torch.testing.assert_close(model(tokens), model.head(by_hand))
    linear = BagOfWordsClassifier(vocab_size=5, n_classes=2)
    assert linear.embedding is None and linear.head.in_features == 5


@pytest.mark.parametrize("embedding_dim", [0, 8])
def test_it_learns_the_sentiment_word_of_generated_reviews(tmp_path, embedding_dim):
    dm = TextDataModule(source=str(write_reviews(tmp_path / "r.csv", n=400)), vocab_size=60, max_len=16, batch_size=32, seed=0)
    held_out = np.setdiff1d(np.arange(400), dm.train_indices)
    torch.manual_seed(0)
    model = BagOfWordsClassifier(**dm.model_kwargs(), embedding_dim=embedding_dim, lr=0.05)
    assert accuracy(model, dm, held_out) < 0.8
    quiet_trainer([], max_epochs=5).fit(model, datamodule=dm)
    assert accuracy(model, dm, held_out) > 0.95  # "great" / "awful" decide the label; the unique id words cannot help on held-out reviews


def test_early_stopping_on_val_loss_reads_the_validation_cross_entropy(tmp_path):
    """Every ClassifierSteps family logs val_loss (the bag of words did not, so EarlyStopping(monitor=val_loss) could not run on it)."""
    from lightning.pytorch.callbacks import EarlyStopping

    dm = TextDataModule(source=str(write_reviews(tmp_path / "r.csv", n=400)), vocab_size=60, max_len=16, batch_size=32, seed=0,
                        val_split="held_out", val_size=100)
    torch.manual_seed(0)
    model = BagOfWordsClassifier(**dm.model_kwargs(), lr=0.05)
    trainer = quiet_trainer([EarlyStopping(monitor="val_loss", patience=1)], max_epochs=3)
    trainer.fit(model, datamodule=dm)
    model.eval()
    with torch.no_grad():  # by hand: the mean cross-entropy over the validation reviews (batches weighted by their size)
        logits = model(torch.from_numpy(dm.tokens[dm.val_indices]))
        expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(dm.pool_labels()[dm.val_indices]).long())
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_dp_sgd_run_spends_what_opacus_accounts_and_still_learns(tmp_path):
    from opacus.accountants import PRVAccountant

    dm = TextDataModule(source=str(write_reviews(tmp_path / "r.csv", n=800)), vocab_size=60, max_len=16, batch_size=100, seed=0)
    held_out = np.setdiff1d(np.arange(800), dm.train_indices)
    torch.manual_seed(0)
    model = BagOfWordsClassifier(**dm.model_kwargs(), lr=0.1)
    quiet_trainer([DPSGD(target_epsilon=4.0, max_grad_norm=1.0)], max_epochs=5).fit(model, datamodule=dm)
    state = model.dp_state
    q = 100 / 400
    assert state["sample_rate"] == q and state["steps"] == 5 * 4 and state["delta"] == pytest.approx(1 / 4000)
    independent = PRVAccountant()
    independent.history = [(state["noise_multiplier"], q, 20)]
    assert state["epsilon"] == pytest.approx(independent.get_epsilon(delta=1 / 4000), rel=1e-6)
    assert 3.9 < state["epsilon"] <= 4.0 and state["noise_multiplier"] > 0.5
    assert accuracy(model, dm, held_out) > 0.8  # the noise at epsilon 4 leaves one decisive word learnable


def test_farm_trains_and_exports_the_bag_family_under_dp_sgd(tmp_path):
    source = write_reviews(tmp_path / "r.csv", n=200)
    recipe = {
        "experiment": {"name": "bag", "root": str(tmp_path / "run")},
        "plan": {"n_models": 2, "seed": 0},
        "data": {"class_path": "mia_lightning.data.text.TextDataModule",
                 "init_args": {"source": str(source), "vocab_size": 60, "max_len": 16, "batch_size": 25}},
        "model": {"class_path": "mia_lightning.models.bag.BagOfWordsClassifier", "init_args": {"lr": 0.1}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "mia_lightning.defences.dp_sgd.DPSGD", "init_args": {"target_epsilon": 2.0}}]},
        "farm": {"engine": "sequential"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert train_main(["farm", "--config", str(tmp_path / "recipe.yaml")]) == 0
    experiment = ExperimentDir(tmp_path / "run" / "bag")
    assert np.load(experiment.model_dir(1) / "logits.npy").shape == (200, 1, 2)
    metrics = load_json(experiment.model_dir(1) / "done.json")["metrics"]
    assert 1.9 < metrics["dp_epsilon"] <= 2.0 and metrics["dp_steps"] == 2 * 4
