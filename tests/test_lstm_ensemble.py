"""The LSTM ensemble: the stacked recurrence against ``nn.LSTM``, and the vectorised farm against the sequential one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from mia_lightning.cli import train_main
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.engine import FarmSetup, ModelJob, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine
from mia_lightning.models.lstm import LSTMClassifier
from mia_lightning.models.lstm_ensemble import VectorisedLSTM
from mia_lightning.models.stacked_lstm import stacked_lstm

from engine_equivalence import assert_engines_agree, assert_experiments_agree
from test_text import fresh_caches, write_recipe, write_reviews  # noqa: F401  (shared builders; the fixture clears the text caches)

N_REVIEWS = 60


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_stacked_lstm_matches_nn_lstm_in_values_and_gradients(layers, bidirectional):
    """Three classifiers in float64: logits and every parameter's gradient equal the single models' (autograd through nn.LSTM)."""
    torch.manual_seed(0)
    models = [LSTMClassifier(vocab_size=30, embedding_dim=5, hidden_size=4, num_layers=layers, bidirectional=bidirectional).double() for _ in range(3)]
    tokens, labels = torch.randint(0, 30, (20, 7)), torch.randint(0, 2, (20,))
    ensemble = VectorisedLSTM(models, tokens, labels).double()
    batch = torch.stack([torch.randperm(20)[:6] for _ in range(3)])
    ensemble.training_step(batch, 0).backward()
    reference = [m(tokens[batch[k]]) for k, m in enumerate(models)]
    sum(F.cross_entropy(logits, labels[batch[k]]) for k, logits in enumerate(reference)).backward()
    torch.testing.assert_close(ensemble(tokens[batch]), torch.stack(reference), rtol=1e-12, atol=1e-12)
    for k, model in enumerate(models):
        torch.testing.assert_close(ensemble.embedding.grad[k], model.embedding.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ensemble.head_weight.grad[k], model.head.weight.grad.t(), rtol=1e-10, atol=1e-12)
        for i, name in enumerate(ensemble.names):
            torch.testing.assert_close(ensemble.w_hh[i].grad[k], getattr(model.lstm, f"weight_hh_{name}").grad.t(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ensemble.w_ih[i].grad[k], getattr(model.lstm, f"weight_ih_{name}").grad.t(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ensemble.b_hh[i].grad[k, 0], getattr(model.lstm, f"bias_hh_{name}").grad, rtol=1e-10, atol=1e-12)


def test_stacked_lstm_gradcheck():
    """The hand-written backward against finite differences (two models, float64)."""
    torch.manual_seed(1)
    xp = torch.randn(2, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    w_hh = (0.5 * torch.randn(2, 2, 8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(stacked_lstm, (xp, w_hh))


def text_setup(source, epochs: int = 3, **model_args) -> FarmSetup:
    return FarmSetup(
        data=ComponentSpec("mia_lightning.data.text.TextDataModule", {"source": str(source), "vocab_size": 40, "max_len": 12, "batch_size": 8}),
        model=ComponentSpec("mia_lightning.models.lstm.LSTMClassifier", {"embedding_dim": 8, "hidden_size": 8, "lr": 0.02, **model_args}),
        trainer={"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    )


def text_jobs(n_models: int = 3) -> list[ModelJob]:
    keep = make_lira_plan(PlanSpec("reviews", N_REVIEWS, n_models, seed=2)).keep
    return [ModelJob(i, np.flatnonzero(keep[i]), model_seed(2, i)) for i in range(n_models)]


@pytest.mark.parametrize(
    "model_args",
    [
        {"optimizer": "adam"},
        {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-3, "label_smoothing": 0.2},
        {"optimizer": "adamw", "num_layers": 2, "bidirectional": True},
    ],
)
def test_same_seeds_give_the_same_lstms(tmp_path, model_args):
    """Weights and pool logits of every model match the sequential Lightning farm to float32 tolerance (groups of 2 split 3 jobs)."""
    setup, jobs = text_setup(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), **model_args), text_jobs()
    vectorised = assert_engines_agree(setup, jobs, LSTMClassifier, (N_REVIEWS, 1, 2), (1e-4, 1e-5), (1e-4, 1e-4))
    assert not np.allclose(vectorised[0].logits, vectorised[1].logits, atol=1e-2)  # models differ: own seeds and subsets


@pytest.mark.parametrize(
    "model_args, fragment",
    [({"lstm": "opacus"}, "lstm 'opacus'"), ({"adv_reg": 1.0}, "adv_reg")],
)
def test_defences_the_ensemble_cannot_stack_are_refused_in_one_line(tmp_path, model_args, fragment):
    setup = text_setup(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), **model_args)
    with pytest.raises(MiaError, match=fragment) as err:
        list(VectorisedEngine(setup).run(text_jobs(2)))
    assert "farm.engine: sequential" in str(err.value) and "\n" not in str(err.value)


def test_dropout_trains_in_the_ensemble(tmp_path):
    """With dropout the masks are the ensemble's own draws: models train (accuracy above chance) but are not the sequential ones."""
    setup, jobs = text_setup(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), epochs=8, dropout=0.3), text_jobs(2)
    results = list(VectorisedEngine(setup).run(jobs))
    assert all(r.metrics["train_acc"] > 0.8 for r in results)


def farms_on_both_engines(tmp_path, model: dict | None = None) -> dict[str, ExperimentDir]:
    """``train.py farm`` of the tiny text recipe (4 models; ``model`` replaces its LSTM) with each engine, groups of 3; the experiments by engine."""
    source = write_reviews(tmp_path / "r.csv", n=N_REVIEWS)
    experiments = {}
    for engine in ("sequential", "vectorised"):
        path = write_recipe(source, tmp_path / engine)
        recipe = yaml.safe_load(path.read_text())
        recipe["trainer"].pop("callbacks")
        recipe["model"] = model or recipe["model"]
        recipe["farm"] = {"engine": engine, "group_size": 3}
        path.write_text(yaml.safe_dump(recipe))
        assert train_main(["farm", "--config", str(path)]) == 0
        experiments[engine] = ExperimentDir(tmp_path / engine / "tiny_text")
    return experiments


def test_cli_farm_vectorised_writes_what_the_sequential_farm_writes(tmp_path):
    """``train.py farm`` with both engines: same keep masks and labels, same files per model, logits to tolerance, done.json names the engine."""
    experiments = farms_on_both_engines(tmp_path)
    assert_experiments_agree(experiments["sequential"], experiments["vectorised"], 4)


def test_cli_farm_auto_engine_trains_lstms_sequentially_on_the_cpu(tmp_path, capsys):
    """The default ``farm.engine: auto`` picks the sequential farm for LSTMs on the CPU, says why, and done.json names the engine that trained."""
    path = write_recipe(write_reviews(tmp_path / "r.csv", n=N_REVIEWS), tmp_path)
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"].pop("callbacks")
    recipe.pop("farm", None)
    path.write_text(yaml.safe_dump(recipe))
    assert train_main(["farm", "--config", str(path), "--plan.n_models", "2"]) == 0
    assert "engine sequential (auto: the LSTMClassifier ensemble is slower than the sequential farm on cpu" in " ".join(capsys.readouterr().out.split())
    experiment = ExperimentDir(tmp_path / "tiny_text")
    assert [yaml.safe_load((experiment.model_dir(i) / "done.json").read_text())["engine"] for i in range(2)] == ["sequential"] * 2


def test_a_family_that_does_not_stack_is_refused_in_one_line():
    setup = FarmSetup(
        data=ComponentSpec("mia_lightning.data.tabular.TabularDataModule", {"source": "digits"}),
        model=ComponentSpec("mia_lightning.models.lstm.LSTMClassifier", {}),
        trainer={"max_epochs": 1},
    )
    with pytest.raises(MiaError, match="LSTMClassifier on TextDataModule") as err:
        VectorisedEngine(setup)
    assert "needs farm.engine: sequential" in str(err.value) and "\n" not in str(err.value)
