"""Causal LMs: the four signals against a per-text loop in float64, the byte-level tokenizer, a farm end to end, bad input."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.cli import attack_main, train_main
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.data.causal_lm import CausalTextDataModule, byte_level_bpe
from mia_lightning.errors import MiaError
from mia_lightning.models.causal_lm import SIGNALS, CausalLM
from test_mlm import audit, write_corpus

TINY_GPT2 = {"n_layer": 1, "n_embd": 16, "n_head": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_corpus")
    write_corpus(root / "pool.csv")
    rng = np.random.default_rng(1)
    common = "the a patient was seen today and has no new complaint follow up in weeks with labs stable".split()
    (root / "public.csv").write_text("text\n" + "".join(" ".join(rng.choice(common, 12)) + ".\n" for _ in range(40)))
    return {"pool": root / "pool.csv", "public": root / "public.csv", "root": root}


@pytest.fixture(scope="module")
def datamodule(corpus) -> CausalTextDataModule:
    return CausalTextDataModule(source=str(corpus["pool"]), tokenizer="pool", vocab_size=300, predict_batch_size=6)


def loop_signals(model: CausalLM, ids: list[int], text: str, k: float) -> list[float]:
    """The four signals of one unpadded text from its own forward pass, token by token in float64."""
    with torch.no_grad():
        logits = model.net(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    log_p, normalised = [], []
    for t in range(1, len(ids)):
        z = logits[t - 1]
        log_softmax = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        p = np.exp(log_softmax)
        mu = float((p * log_softmax).sum())
        sigma = float(np.sqrt((p * (log_softmax - mu) ** 2).sum()))
        log_p.append(float(log_softmax[ids[t]]))
        normalised.append((log_p[-1] - mu) / sigma)
    count = max(1, int(k * len(log_p)))
    mean = float(np.mean(log_p))
    return [mean, mean / len(zlib.compress(text.encode("utf-8"))), float(np.mean(sorted(log_p)[:count])), float(np.mean(sorted(normalised)[:count]))]


def test_signals_match_a_loop_over_tokens(datamodule):
    """Batched, padded signals = loss, zlib ratio (zlib.compress of the original text), Min-K% and Min-K%++ computed text by text."""
    torch.manual_seed(0)
    model = CausalLM(config=TINY_GPT2, score_chunk=4, **datamodule.model_kwargs()).eval()
    batch = next(iter(datamodule.predict_dataloader()))
    with torch.no_grad():
        signals = model.predict_step(batch, 0).numpy()
    assert signals.shape == (6, len(SIGNALS))
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max()  # the batch is padded: padding must not change a text's signals
    for row in range(6):
        index = int(batch["index"][row])
        ids = batch["input_ids"][row, : int(lengths[row])].tolist()
        expected = loop_signals(model, ids, datamodule.pool_texts()[index], 0.2)
        np.testing.assert_allclose(signals[row], expected, rtol=1e-4, atol=1e-5)


def test_the_byte_level_tokenizer_is_lossless_deterministic_and_scores_the_first_word(datamodule, corpus):
    texts = datamodule.pool_texts()
    tokenizer = datamodule.tokenizer
    assert tokenizer.batch_decode([ids.tolist() for ids in datamodule.pool_tokens], skip_special_tokens=True) == texts
    assert all(ids[0] == tokenizer.bos_token_id for ids in datamodule.pool_tokens)
    from mia_lightning.data.causal_lm import _byte_level_bpe

    _byte_level_bpe.cache_clear()
    again = byte_level_bpe(texts, 300)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(again("héllo ✓ wörld")["input_ids"]) > 1 and again.decode(again("héllo ✓ wörld")["input_ids"], skip_special_tokens=True) == "héllo ✓ wörld"
    with pytest.raises(MiaError, match="at least 258"):
        byte_level_bpe(texts, 100)


def write_recipe(corpus: dict[str, Path], root: Path) -> Path:
    recipe = {
        "experiment": {"name": "tiny_lm", "root": str(root)},
        "plan": {"n_models": 5, "seed": 0, "kind": "user_grouped", "n_population": 2, "options": {"n_references": 1}},
        "data": {"class_path": "mia_lightning.data.causal_lm.CausalTextDataModule",
                 "init_args": {"source": str(corpus["pool"]), "tokenizer": "pool", "vocab_size": 300, "public": str(corpus["public"]),
                               "batch_size": 8, "predict_batch_size": 32, "val_size": 16}},
        "model": {"class_path": "mia_lightning.models.causal_lm.CausalLM",
                  "init_args": {"config": {**TINY_GPT2, "n_embd": 32}, "lr": 0.01}},
        "trainer": {"max_epochs": 25, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "farm": {"engine": "sequential"},
    }
    path = root / "recipe.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def farm(corpus) -> ExperimentDir:
    """4 targets trained (25 epochs, overfit) from 1 reference trained on public text, on halves of 14 users."""
    assert train_main(["farm", "--config", str(write_recipe(corpus, corpus["root"] / "farm"))]) == 0
    return ExperimentDir(corpus["root"] / "farm" / "tiny_lm")


def test_farm_names_the_signal_columns_and_the_attacks_read_them(farm):
    plan = json.loads(farm.plan_path.read_text())
    assert plan["signals"] == {"columns": list(SIGNALS), "min_k": 0.2}
    signal = np.load(farm.model_dir(0) / "signal.npy")
    assert signal.shape == (64, 4) and (signal[:, [0, 1, 2]] < 0).all()
    data = AttackData.from_experiment(farm)
    assert data.signal.shape == (5, 64, 1)  # generic signal attacks see the loss column only
    np.testing.assert_array_equal(data.signal[0][:, 0], signal[:, 0])
    attack = create_attack("lm_signals")
    attack.fit(data)
    scores = attack.score(np.array([0, 1]))
    for column, name in enumerate(SIGNALS[1:], start=1):
        np.testing.assert_array_equal(scores[name][0], signal[:, column])
    assert attack.params() == {"min_k": 0.2}


def test_overfit_targets_leak_at_sample_and_user_level(farm):
    """Memorised user-specific words: every LM signal, the reference ratio, LiRA and RMIA separate members; the reference alone cannot."""
    signals = audit(farm, "lm_signals")
    for name in ("zlib_ratio", "min_k", "min_k_plus_plus"):
        assert signals[name][0]["auc"] > 0.7 and signals[name][1]["auc"] > 0.7, name
    ratio = audit(farm, "likelihood_ratio")
    assert ratio["likelihood_ratio"][0]["auc"] > 0.8 and ratio["reference_only"][0]["auc"] == 0.5
    assert audit(farm, "lira", n_shadows=3)["lira_online_fixed"][0]["auc"] > 0.75
    assert audit(farm, "rmia", n_shadows=3)["rmia_online"][0]["auc"] > 0.75


def test_attack_cli_runs_the_lm_attacks_with_the_blind_baseline(farm, capsys):
    argv = ["--experiment", str(farm.root), "--attack", "lm_signals", "loss_baseline", "blind_baseline", "--bootstrap", "0"]
    assert attack_main(argv) == 0
    out = capsys.readouterr().out
    for name in ("zlib_ratio", "min_k", "min_k_plus_plus", "loss_baseline", "blind_baseline"):
        record = json.loads((farm.attacks_dir / name / "results.json").read_text())
        assert record["targets"] == [0, 1, 2, 3] and "user_level" in record and name in out


def test_export_from_checkpoints_reproduces_the_signals(farm):
    before = np.load(farm.model_dir(1) / "signal.npy")
    assert train_main(["export", "--experiment", str(farm.root)]) == 0
    np.testing.assert_allclose(np.load(farm.model_dir(1) / "signal.npy"), before, atol=1e-5)


def test_lm_signals_skip_experiments_without_named_columns():
    from synthetic import synthetic_attack_data

    assert "signal" in create_attack("lm_signals").unmet_requirement(synthetic_attack_data())
    keep = np.zeros((2, 4), dtype=bool)
    keep[0, :2] = keep[1, 2:] = True
    masked_lm = AttackData(keep=keep, labels=np.zeros(4, dtype=np.int64), signal=np.zeros((2, 4, 3)))
    assert "no zlib_ratio column" in create_attack("lm_signals").unmet_requirement(masked_lm)


def test_a_plan_naming_other_columns_than_signal_npy_has_is_one_line(farm, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(farm.root, copy)
    plan = json.loads((copy / "plan.json").read_text())
    plan["signals"]["columns"] = ["loss", "min_k"]
    (copy / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(MiaError, match="names 2 signal kinds but signal.npy has 4 columns"):
        AttackData.from_experiment(ExperimentDir(copy))


def test_a_saved_causal_lm_loads_by_path_and_bad_folders_are_one_line(datamodule, tmp_path):
    torch.manual_seed(0)
    model = CausalLM(config=TINY_GPT2, **datamodule.model_kwargs()).eval()
    model.net.save_pretrained(tmp_path / "lm")
    loaded = CausalLM(pretrained=str(tmp_path / "lm"), **datamodule.model_kwargs()).eval()
    batch = next(iter(datamodule.predict_dataloader()))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.predict_step(batch, 0).numpy(), model.predict_step(batch, 0).numpy(), atol=1e-6)
    with pytest.raises(MiaError, match="vocabulary has 300 tokens but the data's tokenizer has 400"):
        CausalLM(pretrained=str(tmp_path / "lm"), **{**datamodule.model_kwargs(), "vocab_size": 400})
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiaError, match="not a loadable causal language model"):
        CausalLM(pretrained=str(tmp_path / "empty"), **datamodule.model_kwargs())
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    with pytest.raises(MiaError, match="asks to run its own code"):
        CausalLM(pretrained=str(tmp_path / "lm"), **datamodule.model_kwargs())
