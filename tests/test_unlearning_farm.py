"""Unlearning farms on generated data: the attack beats the classic baseline, SISA step counts, U-LiRA, and bad input from the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax
from sklearn.datasets import make_classification

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.cli import attack_main, train_main
from mia_lightning.data.streams import steps_per_epoch
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json
from mia_lightning.contract.runs import latest_run
from mia_lightning.unlearning.contract import load_unlearning
from mia_lightning.unlearning.metrics import target_units, unit_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/unlearning/scratch_single.yaml"


def noisy_csv(path: Path, n_samples: int, seed: int) -> Path:
    """A binary task with 40% flipped labels: an MLP that fits it memorises its training samples."""
    x, y = make_classification(n_samples=n_samples, n_features=20, n_informative=5, flip_y=0.4, random_state=seed)
    rows = [",".join([f"f{i}" for i in range(20)] + ["label"])] + [",".join([f"{v:.5f}" for v in row] + [str(label)]) for row, label in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    return path


def farm(root: Path, name: str, csv: Path, *extra: str, epochs: int = 50, batch_size: int = 32) -> list[str]:
    data = {"class_path": "mia_lightning.data.tabular.TabularDataModule", "init_args": {"source": str(csv), "label_column": "label", "batch_size": batch_size}}
    return ["farm", "--config", str(RECIPE), "--experiment.root", str(root), "--experiment.name", name, "--data", json.dumps(data),
            "--model.init_args.hidden", "[64]", "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false", *extra]


def outputs_of_latest_run(experiment: Path) -> dict[str, dict]:
    folder, run = latest_run(ExperimentDir(experiment))
    return {name: load_json(folder / name / "results.json") for name in run["outputs"]}


def auc_with_interval(experiment: Path, record: dict) -> tuple[float, float, float]:
    """AUC and its bootstrap interval over target originals x samples (the report's)."""
    folder, _ = latest_run(ExperimentDir(experiment))
    scores = np.load(folder / record["attack"] / "scores.npy")
    exp = ExperimentDir(experiment)
    measured = unit_metrics(scores, exp.keep[record["targets"]], record["targets"], target_units(load_unlearning(exp)))
    return measured["auc"], *measured["auc_ci_bootstrap"]


@pytest.fixture(scope="module")
def scratch_farm(tmp_path_factory) -> Path:
    """Single deletions, retraining from scratch: 5 + 5 originals of 150 samples, 30 unlearned models each, 50 epochs (overfit)."""
    root = tmp_path_factory.mktemp("scratch")
    options = {"scenario": "single", "method": "scratch", "originals": 5, "updates": 30, "train_size": 150}
    assert train_main(farm(root, "exp", noisy_csv(root / "data.csv", 600, 0), "--plan.n_models", "310", "--plan.options", json.dumps(options))) == 0
    params = {"unlearning": {"classifiers": ["logistic", "random_forest"], "features": ["sorted_diff", "sorted_concat"]}}
    assert attack_main(["--experiment", str(root / "exp"), "--attack", "unlearning", "--bootstrap", "0", "--params", json.dumps(params)]) == 0
    return root / "exp"


def test_unlearning_attack_beats_the_classic_attack_on_an_overfit_scratch_farm(scratch_farm: Path) -> None:
    results = outputs_of_latest_run(scratch_farm)
    assert results["unlearning_sorted_concat_random_forest"]["auc"] > results["classic_original_random_forest"]["auc"] + 0.05
    assert results["unlearning_sorted_diff_logistic"]["auc"] > results["classic_original_logistic"]["auc"] + 0.05
    assert results["unlearning_sorted_diff_logistic"]["n_members"] == 5 * 30  # each target original's 30 deleted samples vs 30 negatives


def test_unlearning_report_writes_degcount_and_the_baselines(scratch_farm: Path) -> None:
    assert train_main(["unlearning-report", "--experiment", str(scratch_farm)]) == 0
    report = load_json(scratch_farm / "unlearning_report.json")
    row = next(r for r in report["unlearning_attack"] if r["attack"] == "unlearning_sorted_concat_random_forest")
    assert 0.0 <= row["degcount"] <= 1.0 and row["classic_original_auc"] < row["auc"]
    assert "| sorted_concat | random_forest |" in (scratch_farm / "unlearning_report.md").read_text()
    page = (scratch_farm / "unlearning_report.html").read_text()  # the same tables as a page, with the run's ROC inline
    assert "<td>sorted_concat</td><td>random_forest</td>" in page and page.count("data:image/png;base64,") == 1


def test_sisa_retrains_only_the_affected_shard_from_the_affected_slice(tmp_path: Path) -> None:
    options = {"scenario": "multi_version", "method": "sisa", "originals": 1, "updates": 2, "train_size": 90, "shards": 2, "slices": 3}
    args = farm(tmp_path, "sisa", noisy_csv(tmp_path / "data.csv", 300, 1), "--plan.n_models", "8", "--plan.options", json.dumps(options),
                "--farm.engine", "unlearning", epochs=2, batch_size=8)
    assert train_main(args) == 0
    experiment = ExperimentDir(tmp_path / "sisa")
    training = {int(k): v for k, v in load_json(experiment.root / "unlearning.json")["training"].items()}
    retrained = 0
    for model, entry in training.items():
        slices, first = entry["slices"], entry["resume_after"]
        expected = sum(2 * steps_per_epoch(sum(len(s) for s in slices[:stage]), 8) for stage in range(first + 1, len(slices) + 1))
        done = load_json(experiment.model_dir(model) / "done.json")["metrics"]
        assert done["optimizer_steps"] == expected and done["first_slice"] == first + 1
        retrained += first > 0
    assert retrained  # some deletion fell after the first slice, so some retraining skipped slices
    for chain in load_json(experiment.root / "unlearning.json")["chains"]:
        for before, after in zip(chain["versions"], chain["versions"][1:]):
            assert sum(a != b for a, b in zip(before, after)) == 1  # the other shard is the same model
    done = experiment.model_dir(max(training)) / "done.json"  # as if another engine had trained a SISA model without its slices
    done.write_text(done.read_text().replace('"engine": "unlearning"', '"engine": "sequential"'))
    assert attack_main(["--experiment", str(experiment.root), "--attack", "unlearning"]) == 2
    assert not (experiment.root / "attacks").exists()


def straightforward_ulira(data: AttackData, original: int, unlearned: list[int], originals: list[int], partner: int, candidates: np.ndarray) -> np.ndarray:
    """Per-example U-LiRA of one target, loop by loop: Gaussians over the other pairs' unlearned models that forgot / never saw x."""
    logits = np.stack([np.asarray(data.logits.model(m), dtype=np.float64) for m in range(data.n_models)])[:, :, 0, :]
    log_p = log_softmax(logits, axis=-1)
    y = data.labels
    rows = np.arange(data.n_samples)
    p_true = log_p[:, rows, y]
    p_rest = np.log(np.exp(log_p).sum(axis=-1) - np.exp(p_true))
    phi = p_true - p_rest
    target_model = unlearned[originals.index(original)]
    scores = np.full(data.n_samples, np.nan)
    for x in np.flatnonzero(candidates):
        forgot = [phi[u, x] for o, u in zip(originals, unlearned) if o not in (original, partner) and data.keep[o, x]]
        never = [phi[u, x] for o, u in zip(originals, unlearned) if o not in (original, partner) and not data.keep[o, x]]

        def log_density(values: list[float]) -> float:
            mean, std = float(np.mean(values)), float(np.std(values))
            return -0.5 * ((phi[target_model, x] - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)

        scores[x] = log_density(forgot) - log_density(never)
    return scores


@pytest.fixture(scope="module")
def ulira_farm(tmp_path_factory) -> Path:
    """12 paired originals on 600 noisy samples, each forgetting its half of 100 candidates exactly and by fine-tuning."""
    root = tmp_path_factory.mktemp("ulira")
    options = {"inexact": "finetune", "candidates": 100, "finetune_epochs": 3}
    args = farm(root, "exp", noisy_csv(root / "data.csv", 600, 0), "--plan.kind", "unlearning_ulira", "--plan.n_models", "36",
                "--plan.options", json.dumps(options), "--farm.engine", "unlearning")
    assert train_main(args) == 0
    assert attack_main(["--experiment", str(root / "exp"), "--attack", "ulira", "--bootstrap", "0"]) == 0
    return root / "exp"


def test_ulira_is_at_chance_for_exact_and_above_for_inexact_unlearning(ulira_farm: Path) -> None:
    results = outputs_of_latest_run(ulira_farm)
    exact = auc_with_interval(ulira_farm, results["ulira_exact"])
    inexact = auc_with_interval(ulira_farm, results["ulira_inexact"])
    before = auc_with_interval(ulira_farm, results["lira_before"])
    assert exact[1] < 0.5 < exact[2]
    assert inexact[1] > 0.5 and before[1] > 0.5


def test_ulira_matches_a_straightforward_per_example_implementation(ulira_farm: Path) -> None:
    data = AttackData.from_experiment(ExperimentDir(ulira_farm))
    attack = create_attack("ulira")
    attack.fit(data)
    info = load_json(ulira_farm / "plan.json")["info"]["unlearning"]
    originals = load_json(ulira_farm / "plan.json")["info"]["target_models"]
    targets = np.asarray(originals[:3])
    scored = attack.score(targets)
    for row, original in enumerate(targets):
        partner = int(attack.partner[originals.index(int(original))])
        for name, models in (("ulira_exact", info["exact_models"]), ("ulira_inexact", info["inexact_models"])):
            expected = straightforward_ulira(data, int(original), models, originals, originals[partner], attack.candidates)
            np.testing.assert_allclose(scored[name][row], expected, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_bad_unlearning_input_is_one_line_and_writes_nothing(tmp_path: Path, scratch_farm: Path, capsys) -> None:
    options = {"method": "sisa", "shards": 400, "train_size": 150, "originals": 1, "updates": 2}
    assert train_main(farm(tmp_path, "bad", noisy_csv(tmp_path / "data.csv", 600, 0), "--plan.n_models", "10", "--plan.options", json.dumps(options))) == 2
    assert "--plan.options.shards 400: more shards than training samples" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    for tamper, phrase in ((lambda u, keep: u["chains"][0]["versions"].__setitem__(1, [9999]), "names model 9999"),
                           (lambda u, keep: u["chains"][0]["steps"][0].__setitem__("deleted", [int(np.flatnonzero(~keep[u["chains"][0]["versions"][0][0]])[0])]),
                            "which is not in the training set")):
        copy = tmp_path / f"copy{len(phrase)}"
        shutil.copytree(scratch_farm, copy, ignore=shutil.ignore_patterns("attacks", "unlearning_report.*"))
        unlearning = load_json(copy / "unlearning.json")
        tamper(unlearning, np.load(copy / "keep.npy"))
        (copy / "unlearning.json").write_text(json.dumps(unlearning))
        assert attack_main(["--experiment", str(copy), "--attack", "unlearning"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and phrase in err and "\n" not in err
        assert not (copy / "attacks").exists()
    shutil.copytree(scratch_farm, tmp_path / "plain", ignore=shutil.ignore_patterns("attacks", "unlearning*"))
    assert train_main(["unlearning-report", "--experiment", str(tmp_path / "plain")]) == 2
    assert "unlearning.json: missing" in capsys.readouterr().err
