"""Masked LMs: signals against loop computations on a tiny BERT, fixed masks, the user-grouped plan, a farm end to end, bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.cli import train_main
from mia_lightning.data.mlm import MLMTextDataModule, drop_shared_sentences, pack_texts, parse_clinosim_documents, parse_speeches
from mia_lightning.data.plan import PlanSpec, make_plan
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.grouping import user_level
from mia_lightning.metrics import evaluate_scores
from mia_lightning.models.mlm import MaskedLM

TINY_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
COMMON = "the a patient was seen today and has no new complaint follow up in weeks with labs stable".split()


def write_corpus(path: Path, n_users: int = 16, per_user: int = 4, seed: int = 0, marker: dict[int, str] | None = None) -> None:
    """Texts of common words plus words only their user writes (what a model can memorise)."""
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "user"])
        for user in range(n_users):
            own = [f"u{user}w{k}" for k in range(6)]
            for _ in range(per_user):
                words = list(rng.choice(COMMON, 8)) + list(rng.choice(own, 4)) + ([marker[user]] if marker else [])
                rng.shuffle(words)
                writer.writerow([" ".join(words) + ".", f"user-{user}"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "pool.csv")
    rng = np.random.default_rng(1)
    with (root / "public.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        for _ in range(40):
            writer.writerow([" ".join(rng.choice(COMMON, 12)) + "."])
    return {"pool": root / "pool.csv", "public": root / "public.csv", "root": root}


@pytest.fixture(scope="module")
def datamodule(corpus) -> MLMTextDataModule:
    return MLMTextDataModule(source=str(corpus["pool"]), tokenizer="pool", predict_batch_size=6)


def tiny_model(datamodule: MLMTextDataModule, seed: int = 0, **kwargs) -> MaskedLM:
    torch.manual_seed(seed)
    return MaskedLM(config=TINY_BERT, **{"n_maskings": 3, **kwargs}, **datamodule.model_kwargs()).eval()


def first_batch(datamodule: MLMTextDataModule) -> dict[str, torch.Tensor]:
    return next(iter(datamodule.predict_dataloader()))


def loop_log_prob(model: MaskedLM, ids: list[int], masked: list[int]) -> list[float]:
    """log p(original token) at each masked position of ONE unpadded text, from the full forward pass (all vocabulary logits)."""
    corrupted = list(ids)
    for position in masked:
        corrupted[position] = model.hparams.mask_token_id
    with torch.no_grad():
        logits = model.net(input_ids=torch.tensor([corrupted])).logits[0]
    return [float(torch.log_softmax(logits[p].double(), dim=-1)[ids[p]]) for p in masked]


def text_ids(batch: dict[str, torch.Tensor], row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


def test_loss_signal_matches_a_loop_over_maskings(datamodule):
    """minus the mean NLL of floor(15% n) positions per masking, drawn from default_rng([mask_seed, pool index])."""
    model = tiny_model(datamodule, mask_seed=7)
    batch = first_batch(datamodule)
    with torch.no_grad():
        signal = model.predict_step(batch, 0)
    special = set(datamodule.model_kwargs()["special_token_ids"])
    assert signal.shape == (6, 3)
    for row in range(6):
        ids = text_ids(batch, row)
        valid = [p for p, token in enumerate(ids) if token not in special]
        keys = np.random.default_rng([7, int(batch["index"][row])]).random((3, len(valid)))
        k = max(1, math.floor(0.15 * len(valid)))
        for q in range(3):
            chosen = [valid[i] for i in np.argsort(keys[q])[:k]]
            expected = np.mean(loop_log_prob(model, ids, chosen))
            assert float(signal[row, q]) == pytest.approx(expected, abs=2e-5)


@pytest.mark.parametrize("kind", ["pll", "energy"])
def test_pll_and_energy_match_a_loop_over_positions(datamodule, kind):
    model = tiny_model(datamodule, signal=kind, score_chunk=7)  # chunks cut across texts
    batch = first_batch(datamodule)
    with torch.no_grad():
        signal = model.predict_step(batch, 0)
    special = set(datamodule.model_kwargs()["special_token_ids"])
    assert signal.shape == (6, 1)
    for row in range(6):
        ids = text_ids(batch, row)
        valid = [p for p, token in enumerate(ids) if token not in special]
        pll = sum(loop_log_prob(model, ids, [p])[0] for p in valid)
        expected = pll / len(valid) if kind == "energy" else pll
        assert float(signal[row, 0]) == pytest.approx(expected, abs=1e-4)


def test_masked_only_projection_equals_the_full_forward(datamodule):
    model = tiny_model(datamodule)
    batch = first_batch(datamodule)
    rows, columns = model.scored_positions(batch["input_ids"], batch["attention_mask"]).nonzero(as_tuple=True)
    args = (batch["input_ids"], batch["attention_mask"], rows, columns, batch["input_ids"][rows, columns])
    with torch.no_grad():
        fast, fast_correct = model.masked_log_probs(*args)
        head, model.head = model.head, None
        full, full_correct = model.masked_log_probs(*args)
        model.head = head
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)
    assert torch.equal(fast_correct, full_correct)


def test_masks_are_identical_for_every_model_and_any_batching(datamodule):
    batch = first_batch(datamodule)
    target, reference = tiny_model(datamodule, seed=1), tiny_model(datamodule, seed=2)
    assert not torch.equal(target.net.bert.embeddings.word_embeddings.weight, reference.net.bert.embeddings.word_embeddings.weight)
    masks = target.scoring_masks(batch)
    assert torch.equal(masks, reference.scoring_masks(batch))
    single = {key: value[3:4] for key, value in batch.items()}
    length = int(single["attention_mask"].sum())
    single = {key: (value[:, :length] if value.ndim == 2 else value) for key, value in single.items()}
    assert torch.equal(target.scoring_masks(single)[0], masks[3, :, :length])
    assert not torch.equal(masks[:, 0], masks[:, 1])  # the maskings differ from each other
    assert (masks[:, :, 0] == False).all()  # [CLS] is never masked  # noqa: E712


def write_recipe(corpus: dict[str, Path], root: Path, pool: Path | None = None, **data_overrides) -> Path:
    recipe = {
        "experiment": {"name": "tiny", "root": str(root)},
        "plan": {"n_models": 5, "seed": 0, "kind": "user_grouped", "n_population": 2, "options": {"n_references": 1}},
        "data": {"class_path": "mia_lightning.data.mlm.MLMTextDataModule",
                 "init_args": {"source": str(pool or corpus["pool"]), "tokenizer": "pool", "public": str(corpus["public"]),
                               "batch_size": 8, "predict_batch_size": 32, "val_size": 16, **data_overrides}},
        "model": {"class_path": "mia_lightning.models.mlm.MaskedLM",
                  "init_args": {"config": {**TINY_BERT, "hidden_size": 32, "intermediate_size": 64}, "n_maskings": 4, "lr": 0.003}},
        "trainer": {"max_epochs": 30, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "farm": {"engine": "sequential"},
    }
    path = root / "recipe.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def audit(experiment: ExperimentDir, attack: str, **params) -> dict[str, tuple[dict, dict]]:
    """(sample-level, user-level) metrics of each output of ``attack`` on the plan's targets."""
    data = AttackData.from_experiment(experiment)
    targets = np.asarray(experiment.default_targets() or range(data.n_models))
    out = {}
    for name, scores in score_targets(create_attack(attack, **params), data, targets).items():
        pairs = np.where(data.audit_pairs(targets), scores, np.nan)
        users = user_level(pairs, data.keep[targets], data.groups, targets=targets)
        out[name] = (evaluate_scores(pairs, data.keep[targets])[0], evaluate_scores(users[0], users[1])[0])
    return out


@pytest.fixture(scope="module")
def farm(corpus) -> ExperimentDir:
    """4 targets fine-tuned (30 epochs, overfit) from 1 reference trained on public text, on halves of 14 users."""
    recipe = write_recipe(corpus, corpus["root"] / "farm")
    assert train_main(["farm", "--config", str(recipe)]) == 0
    return ExperimentDir(corpus["root"] / "farm" / "tiny")


def test_farm_writes_a_user_grouped_signal_experiment(farm):
    plan = json.loads(farm.plan_path.read_text())
    assert plan["info"]["target_models"] == [0, 1, 2, 3] and plan["info"]["reference_models"] == [4]
    assert plan["parents"] == {str(t): 4 for t in range(4)}
    keep, groups = farm.keep, farm.groups
    assert not keep[4].any() and not keep[:, farm.population].any()
    for user in np.unique(groups):
        rows = keep[:4, groups == user]
        assert (rows == rows[:, :1]).all()  # a user is all IN or all OUT of each model
        if not np.isin(np.flatnonzero(groups == user), farm.population).any():
            assert rows[:, 0].sum() == 2  # IN for exactly half the targets
    signal = np.load(farm.model_dir(0) / "signal.npy")
    assert signal.shape == (64, 4) and (signal < 0).all()


def test_overfit_targets_leak_and_the_ratio_calibrates(farm):
    """Memorised user-specific words: the ratio and LiRA separate members at sample and user level; the reference alone cannot."""
    ratio = audit(farm, "likelihood_ratio")
    loss = audit(farm, "loss_baseline")["loss_baseline"]
    assert ratio["likelihood_ratio"][0]["auc"] > 0.8 and ratio["likelihood_ratio"][1]["auc"] > 0.8
    assert ratio["likelihood_ratio"][0]["auc"] > loss[0]["auc"]
    assert ratio["reference_only"][0]["auc"] == 0.5  # the same reference score is a member under half the targets
    lira = audit(farm, "lira", n_shadows=3)
    assert lira["lira_online_fixed"][0]["auc"] > 0.75
    rmia = audit(farm, "rmia", n_shadows=3)
    assert rmia["rmia_online"][0]["auc"] > 0.75


def test_attack_cli_on_the_farm(farm, capsys):
    """attack.py runs the MLM attacks and the baselines through the one pipeline; user-level metrics come with them."""
    from mia_lightning.cli import attack_main

    argv = ["--experiment", str(farm.root), "--attack", "likelihood_ratio", "loss_baseline", "blind_baseline", "--bootstrap", "0"]
    assert attack_main(argv) == 0
    out = capsys.readouterr().out
    for name in ("likelihood_ratio", "reference_only", "loss_baseline", "blind_baseline"):
        record = json.loads((farm.attacks_dir / name / "results.json").read_text())
        assert record["targets"] == [0, 1, 2, 3] and name in out
    assert json.loads((farm.attacks_dir / "likelihood_ratio" / "results.json").read_text())["params"]["references"] == [4]


def test_export_from_checkpoints_reproduces_the_signals(farm):
    before = np.load(farm.model_dir(2) / "signal.npy")
    assert train_main(["export", "--experiment", str(farm.root)]) == 0
    np.testing.assert_allclose(np.load(farm.model_dir(2) / "signal.npy"), before, atol=1e-5)


def test_likelihood_ratio_refuses_a_reference_as_target(farm):
    data = AttackData.from_experiment(farm)
    with pytest.raises(MiaError, match="model 4 is a reference model"):
        score_targets(create_attack("likelihood_ratio"), data, np.array([0, 4]))
    with pytest.raises(MiaError, match="references"):
        score_targets(create_attack("likelihood_ratio", references=[9]), data, np.array([0]))


def test_signal_attacks_skip_logit_experiments(tmp_path):
    from synthetic import synthetic_attack_data

    data = synthetic_attack_data()
    for name in ("likelihood_ratio", "loss_baseline", "blind_baseline"):
        assert create_attack(name).unmet_requirement(data) is not None


def blind_experiment(root: Path, corpus_path: Path, members_by_user: np.ndarray) -> ExperimentDir:
    """A one-target experiment over a CSV pool whose membership is given per user (no training: the blind baseline needs none)."""
    datamodule = MLMTextDataModule(source=str(corpus_path), tokenizer="pool")
    groups = datamodule.pool_groups()
    user_numbers = np.array([int(user.split("-")[1]) for user in datamodule.pool.users])
    root.mkdir(parents=True)
    np.save(root / "keep.npy", members_by_user[user_numbers][None, :])
    np.save(root / "labels.npy", datamodule.pool_labels())
    np.save(root / "groups.npy", groups)
    (root / "models" / "0000").mkdir(parents=True)
    np.save(root / "models" / "0000" / "signal.npy", np.zeros((groups.size, 1), dtype=np.float32))
    (root / "data" / "source").mkdir(parents=True)
    shutil.copy(corpus_path, root / "data" / "source" / corpus_path.name)  # as the farm copies a recipe's CSV: config.yaml names data inside
    (root / "config.yaml").write_text(yaml.safe_dump({"data": {"class_path": "mia_lightning.data.mlm.MLMTextDataModule",
                                                               "init_args": {"source": f"data/source/{corpus_path.name}", "tokenizer": "pool"}}}))
    return ExperimentDir(root)


def test_blind_baseline_sees_a_shift_and_nothing_without_one(tmp_path):
    n_users = 60
    shifted = np.arange(n_users) < 30
    write_corpus(tmp_path / "shifted.csv", n_users, marker={u: ("alpha" if shifted[u] else "omega") for u in range(n_users)})
    write_corpus(tmp_path / "plain.csv", n_users, seed=3)
    sample, user = audit(blind_experiment(tmp_path / "a", tmp_path / "shifted.csv", shifted), "blind_baseline")["blind_baseline"]
    assert sample["auc"] > 0.95 and user["auc"] > 0.95
    random_half = np.random.default_rng(0).permutation(n_users) < 30
    sample, _ = audit(blind_experiment(tmp_path / "b", tmp_path / "plain.csv", random_half), "blind_baseline")["blind_baseline"]
    assert abs(sample["auc"] - 0.5) < 0.15


def test_user_grouped_plan_by_users_with_references():
    groups = np.repeat(np.arange(10), [1, 2, 3, 1, 2, 3, 1, 2, 3, 4])
    spec = PlanSpec("x", groups.size, 7, seed=3, kind="user_grouped", n_population=2, options={"n_references": 1})
    plan = make_plan(spec, np.zeros(groups.size, dtype=np.int64), groups)
    population_users = np.unique(groups[plan.population])
    assert population_users.size == 2 and plan.info["population_users"] == population_users.tolist()
    for user in np.setdiff1d(np.arange(10), population_users):
        rows = plan.keep[:6, groups == user]
        assert (rows == rows[:, :1]).all() and rows[:, 0].sum() == 3
    assert not plan.keep[6].any() and plan.parents == {t: 6 for t in range(6)}
    again = make_plan(spec, np.zeros(groups.size, dtype=np.int64), groups)
    np.testing.assert_array_equal(plan.keep, again.keep)


@pytest.mark.parametrize(
    "options, groups, fragment",
    [
        ({}, None, "pool_groups()"),
        ({"n_refs": 1}, np.arange(12), "unknown option"),
        ({"n_references": 5}, np.arange(12), "at least 2 targets"),
        ({"fine_tune_from_reference": True}, np.arange(12), "needs n_references"),
    ],
)
def test_user_grouped_plan_errors(options, groups, fragment):
    spec = PlanSpec("x", 12, 6, kind="user_grouped", options=options)
    with pytest.raises(MiaError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_plan(spec, None, groups)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("text,author\nhello there,a\nbye now,b\n", "no column 'user' in header ['text', 'author']; set data.init_args.user_column to one of them"),
        ("text,user\nhello there,a\n   ,b\nbye now,c\n", "1 empty texts"),
        ("text,user\nhello there,a\nbye now,\n", "have no user"),
    ],
)
def test_bad_text_csv_fails_the_farm_in_one_line_and_writes_nothing(corpus, tmp_path, capsys, content, fragment):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    recipe = write_recipe(corpus, tmp_path / "run", pool=bad)
    assert train_main(["farm", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.strip().count("\n") == 0
    assert not (tmp_path / "run" / "tiny").exists()


def test_a_model_path_that_is_not_an_mlm_is_refused(corpus, datamodule, tmp_path):
    from transformers import BertConfig, BertModel

    encoder = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=datamodule.model_kwargs()["vocab_size"], **TINY_BERT)).save_pretrained(encoder)
    with pytest.raises(MiaError, match="no masked-LM head") as err:
        MaskedLM(pretrained=str(encoder), **datamodule.model_kwargs())
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiaError, match="not a loadable masked language model"):
        MaskedLM(pretrained=str(tmp_path / "empty"), **datamodule.model_kwargs())
    recipe = write_recipe(corpus, tmp_path / "run")
    assert train_main(["farm", "--config", str(recipe), "--model.init_args.pretrained", str(encoder)]) == 2
    assert not (tmp_path / "run" / "tiny").exists()


def test_a_saved_mlm_loads_and_vocabulary_must_match(datamodule, tmp_path):
    model = tiny_model(datamodule)
    model.net.save_pretrained(tmp_path / "mlm")
    loaded = MaskedLM(pretrained=str(tmp_path / "mlm"), n_maskings=3, **datamodule.model_kwargs()).eval()
    batch = first_batch(datamodule)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_step(batch, 0), model.predict_step(batch, 0))
    with pytest.raises(MiaError, match="vocabulary has"):
        MaskedLM(pretrained=str(tmp_path / "mlm"), **{**datamodule.model_kwargs(), "vocab_size": 7})


def test_drop_shared_sentences_and_packing():
    texts = ["Follow up in 3 months. BP 120/80 today.", "Follow up in 3 months. Lives alone!", "BP 120/80 today.\nNew cough"]
    users = ["a", "b", "a"]
    assert drop_shared_sentences(texts, users) == ["BP 120/80 today.", "Lives alone!", "BP 120/80 today. New cough"]
    assert pack_texts(["a b", "c d e", "f", "g h i j"], 4) == ["a b c d e", "f g h i j"]


def test_speeches_and_clinical_notes_are_parsed(tmp_path):
    play = "# A Play\n\n## ACT I\n\n_Enter KING_\n\n**KING**  \nNow is the winter  \nof our discontent.\n\n**FIRST LORD**  \nAy.\n_Exit_\n"
    assert parse_speeches(play) == [("KING", "Now is the winter of our discontent."), ("FIRST LORD", "Ay.")]
    folder = tmp_path / "cif" / "narratives" / "template" / "documents" / "ENC-POP-000042-1"
    folder.mkdir(parents=True)
    (folder / "doc-ENC-POP-000042-1-01.json").write_text(json.dumps(
        {"encounter_id": "ENC-VAX-POP-000042-1", "narrative": {"text": "", "sections": {"subjective": "Cough.", "plan": "Rest."}}}))
    assert parse_clinosim_documents(tmp_path / "cif") == [("POP-000042", "Cough.\nRest.")]


def test_a_bf16_farm_rerun_with_the_same_threads_is_bit_identical(corpus, tmp_path):
    """Same machine, same thread count, bf16-mixed: a re-run reproduces every signal bit for bit (docs/mlm.md, "Reproducibility")."""
    signals = []
    for run in ("first", "second"):
        recipe = write_recipe(corpus, tmp_path / run)
        settings = yaml.safe_load(recipe.read_text())
        settings["plan"]["n_models"] = 3
        settings["trainer"] |= {"max_epochs": 1, "precision": "bf16-mixed"}
        recipe.write_text(yaml.safe_dump(settings))
        assert train_main(["farm", "--config", str(recipe)]) == 0
        signals.append(np.stack([np.load(tmp_path / run / "tiny" / "models" / f"{i:04d}" / "signal.npy") for i in range(3)]))
    np.testing.assert_array_equal(signals[0], signals[1])
