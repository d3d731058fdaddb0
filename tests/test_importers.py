"""``train.py import-scores``: the published MLM score files reproduce the paper's attack correctly paired; generic tables; bad input."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.cli import train_main
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.grouping import population_thresholds
from mia_lightning.importers import PUBLISHED_SCORES, import_mlm_mia, published_run, read_score_file
from mia_lightning.metrics import evaluate_scores, rank_auc


def audit(root: Path, attack: str, **params) -> dict[str, dict]:
    """Metrics of every output of ``attack`` on an experiment directory (targets from plan.json)."""
    experiment = ExperimentDir(root)
    data = AttackData.from_experiment(experiment)
    targets = np.asarray(experiment.default_targets())
    scored = score_targets(create_attack(attack, **params), data, targets)
    pairs = data.audit_pairs(targets)
    return {name: evaluate_scores(np.where(pairs, s, np.nan), data.keep[targets])[0] for name, s in scored.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """The shipped files imported with each non-member set (and the enorm files)."""
    root = tmp_path_factory.mktemp("published")
    runs = {"out_samples": ["--nonmembers", "out_samples"], "i2b2": ["--nonmembers", "i2b2"], "enorm": ["--nonmembers", "i2b2", "--measure", "enorm"]}
    for name, extra in runs.items():
        assert train_main(["import-scores", "mlm_mia", "--experiment", str(root / name), *extra]) == 0
    return {name: root / name for name in runs}


@pytest.mark.parametrize(
    "name, ratio_auc, ratio_tpr, loss_auc",
    [("out_samples", 0.928, 0.604, 0.661), ("i2b2", 0.904, 0.312, 0.813), ("enorm", 0.893, 0.232, 0.799)],
)
def test_published_scores_correctly_paired(published, name, ratio_auc, ratio_tpr, loss_auc):
    ratio = audit(published[name], "likelihood_ratio")
    loss = audit(published[name], "loss_baseline")["loss_baseline"]
    assert ratio["likelihood_ratio"]["auc"] == pytest.approx(ratio_auc, abs=0.005)
    assert ratio["likelihood_ratio"]["tpr_at_fpr"]["0.01"] == pytest.approx(ratio_tpr, abs=0.01)
    assert loss["auc"] == pytest.approx(loss_auc, abs=0.005)
    assert ratio["likelihood_ratio"]["n_members"] == {"out_samples": 13983, "i2b2": 13983, "enorm": 16687}[name]


def test_published_layout_and_population(published):
    experiment = ExperimentDir(published["out_samples"])
    assert experiment.keep.shape == (2, 13983 + 1718 + 2424)
    assert experiment.keep[0, :13983].all() and not experiment.keep[0, 13983:].any() and not experiment.keep[1].any()
    np.testing.assert_array_equal(experiment.population, np.arange(13983 + 1718, 13983 + 1718 + 2424))
    assert experiment.plan["info"]["target_models"] == [0] and experiment.plan["info"]["reference_models"] == [1]
    target = read_score_file(published_run(PUBLISHED_SCORES, "loss", "samples_sub_id_long.csv", "ClinicalBERT_1a"))
    np.testing.assert_array_equal(np.load(experiment.model_dir(0) / "signal.npy")[:13983, 0], -target)


def test_reference_alone_shows_the_distribution_shift(published):
    """The reference never saw MIMIC or i2b2, yet it separates the sets: members and non-members differ in distribution."""
    assert audit(published["i2b2"], "likelihood_ratio")["reference_only"]["auc"] == pytest.approx(0.31, abs=0.01)


def _paper_metric_script(seed: int = 2) -> tuple[float, float, list[float]]:
    """The published metric script's sample-level loop (``get_sample_metrics.py``), rewritten here to show its two flaws.

    Returns (mean loss AUC, mean ratio AUC, ratio thresholds per iteration) over its 10 iterations:
    members subsampled to the non-member count with target and reference rows drawn independently,
    and the population list sorted in place inside the threshold function.
    """
    def load(csv: str, model: str) -> list[float]:
        return read_score_file(published_run(PUBLISHED_SCORES, "loss", csv, model)).tolist()

    main_in, ref_in = load("samples_sub_id_long.csv", "ClinicalBERT_1a"), load("samples_sub_id_long.csv", "pubmed")
    main_out, ref_out = load("out_samples_sub_id_long.csv", "ClinicalBERT_1a"), load("out_samples_sub_id_long.csv", "pubmed")
    pop_in, pop_out = load("i2b2_samples_sub_id_long_2.csv", "ClinicalBERT_1a"), load("i2b2_samples_sub_id_long_2.csv", "pubmed")
    rng = random.Random(seed)
    labels = np.r_[np.ones(len(main_out)), np.zeros(len(main_out))].astype(bool)
    loss_aucs, ratio_aucs, thresholds = [], [], []
    for _ in range(10):
        sample_main, sample_ref = rng.sample(main_in, len(main_out)), rng.sample(ref_in, len(main_out))  # independent draws
        loss_aucs.append(rank_auc(-np.r_[sample_main, main_out], labels))
        ratio_aucs.append(rank_auc(-(np.r_[sample_main, main_out] - np.r_[sample_ref, ref_out]), labels))
        diff_population = sorted((a - b for a, b in zip(pop_in, pop_out)), reverse=True)
        thresholds.append(diff_population[int(len(diff_population) * 0.9) + 1])
        pop_in.sort(reverse=True)  # the script's in-place sort: later iterations pair sorted target with unsorted reference values
    return float(np.mean(loss_aucs)), float(np.mean(ratio_aucs)), thresholds


def test_as_published_numbers_come_from_mismatched_pairs(published):
    """0.66 -> 0.90 as published; correctly paired on the same data the ratio reaches 0.928, and the paper's threshold drifts."""
    loss_auc, ratio_auc, thresholds = _paper_metric_script()
    assert loss_auc == pytest.approx(0.6616, abs=5e-4)
    assert ratio_auc == pytest.approx(0.8997, abs=5e-4)
    correct = audit(published["out_samples"], "likelihood_ratio")["likelihood_ratio"]["auc"]
    assert correct - ratio_auc > 0.02
    experiment = ExperimentDir(published["out_samples"])
    signals = [np.load(experiment.model_dir(i) / "signal.npy")[experiment.population, 0] for i in (0, 1)]
    ours = population_thresholds((signals[0] - signals[1])[None, :], 0.1, rule="paper")[0]
    assert -ours == pytest.approx(thresholds[0], abs=1e-12)  # first iteration: correctly paired
    assert all(abs(t - thresholds[0]) > 1e-3 for t in thresholds[1:])  # afterwards: corrupted by the in-place sort


def _copy_published(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(PUBLISHED_SCORES / "loss_values", source / "loss_values")
    for path in source.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return source


def test_score_files_of_different_lengths_are_refused(tmp_path, capsys):
    source = _copy_published(tmp_path)
    reference = published_run(source, "loss", "out_samples_sub_id_long.csv", "pubmed")
    reference.write_text("\n".join(reference.read_text().splitlines()[:-3]) + "\n")
    target = tmp_path / "exp"
    assert train_main(["import-scores", "mlm_mia", "--source", str(source), "--experiment", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "1718 scores" in err and "1715" in err
    assert not target.exists() and not list(tmp_path.glob(".exp*"))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--nonmembers", "mimic"], "--nonmembers 'mimic'"),
        (["--measure", "enorm", "--nonmembers", "out_samples"], "non-member sets i2b2"),
        (["--measure", "energy"], "--measure 'energy'"),
        (["--population", "all"], "--population 'all'"),
    ],
)
def test_bad_options(tmp_path, capsys, argv, fragment):
    assert train_main(["import-scores", "mlm_mia", "--experiment", str(tmp_path / "exp"), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "exp").exists()


def test_garbage_line_and_existing_experiment(tmp_path, capsys):
    source = _copy_published(tmp_path)
    member = published_run(source, "loss", "samples_sub_id_long.csv", "ClinicalBERT_1a")
    lines = member.read_text().splitlines()
    lines[6] = "nan?"
    member.write_text("\n".join(lines) + "\n")
    assert train_main(["import-scores", "mlm_mia", "--source", str(source), "--experiment", str(tmp_path / "exp")]) == 2
    assert ":7: 'nan?' is not a number" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.npy").write_text("mine")
    assert train_main(["import-scores", "mlm_mia", "--experiment", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.npy").read_text() == "mine"


def test_population_can_be_left_out(tmp_path):
    imported = import_mlm_mia(PUBLISHED_SCORES, "out_samples", population=False)
    assert imported.keep.shape == (2, 13983 + 1718) and imported.population.size == 0


def table_rows(n_users: int = 30, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 3)
    member = np.where(users < 12, 1, np.where(users < 26, 0, -1))
    reference = rng.normal(3.0, 0.5, users.size)
    target = reference - 0.4 * (member == 1) + rng.normal(0, 0.1, users.size)  # losses: members lower
    return target, reference, users, member


def test_table_csv_with_users_and_population(tmp_path, capsys):
    target, reference, users, member = table_rows()
    path = tmp_path / "scores.csv"
    path.write_text("user,target,reference,member\n" + "".join(f"patient-{u},{float(t)!r},{float(r)!r},{m}\n" for u, t, r, m in zip(users, target, reference, member)))
    assert train_main(["import-scores", "table", "--source", str(path), "--scores", "loss", "--experiment", str(tmp_path / "exp")]) == 0
    assert "30 users" in capsys.readouterr().out
    experiment = ExperimentDir(tmp_path / "exp")
    np.testing.assert_array_equal(experiment.population, np.flatnonzero(member == -1))
    assert len(np.unique(experiment.groups)) == 30
    data = AttackData.from_experiment(experiment)
    scores = score_targets(create_attack("likelihood_ratio"), data, np.array([0]))["likelihood_ratio"][0]
    np.testing.assert_allclose(scores, -(target - reference), rtol=1e-12)
    assert audit(tmp_path / "exp", "likelihood_ratio")["likelihood_ratio"]["auc"] == 1.0


def test_table_npy_in_the_documented_column_order(tmp_path):
    target, reference, users, member = table_rows()
    np.save(tmp_path / "scores.npy", np.stack([-target, -reference, users, member], axis=1))
    assert train_main(["import-scores", "table", "--source", str(tmp_path / "scores.npy"), "--scores", "signal", "--experiment", str(tmp_path / "exp")]) == 0
    signal = np.load(tmp_path / "exp" / "models" / "0000" / "signal.npy")
    np.testing.assert_array_equal(signal[:, 0], -target)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("user,reference,member\n1,2.0,1\n2,3.0,0\n", "no 'target' column"),
        ("target,member\n1.0,1\n2.0,2\n", "must hold 1 (member), 0 (non-member) or -1"),
        ("target,member\n1.0,1\nx,0\n", "column 'target' holds 'x'"),
        ("target,member\n1.0,1\n2.0,1\n", "needs both members (1) and non-members (0)"),
        ("target,member\n1.0,1\n2.0\n", ":3: 1 fields"),
        ("target,target,member\n1.0,5.0,1\n2.0,6.0,0\n", "header names column 'target' more than once"),
        # a misspelt optional column was ignored: the experiment silently had no reference model
        ("target,refrence,member\n1.0,5.0,1\n2.0,6.0,0\n", "column 'refrence' is not one of target, reference, user, member"),
    ],
)
def test_bad_tables(tmp_path, capsys, content, fragment):
    path = tmp_path / "scores.csv"
    path.write_text(content)
    assert train_main(["import-scores", "table", "--source", str(path), "--scores", "loss", "--experiment", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "exp").exists()


def test_table_needs_the_score_kind(tmp_path, capsys):
    assert train_main(["import-scores", "table", "--source", str(tmp_path / "x.csv"), "--experiment", str(tmp_path / "exp")]) == 2
    assert "--scores loss|signal" in capsys.readouterr().err


@pytest.mark.parametrize("arrays, fragment", [
    ({"target": np.zeros((4, 2)), "member": np.array([1, 0, 1, 0])}, "column 'target' has shape (4, 2), expected one value per sample"),
    ({"target": np.zeros(4), "user": np.zeros((4, 1)), "member": np.array([1, 0, 1, 0])}, "column 'user' has shape (4, 1)"),
    ({"target": np.array([1 + 2j, 0, 1, 0]), "member": np.array([1, 0, 1, 0])}, "column 'target' holds complex numbers"),
])
def test_bad_npz_tables(tmp_path, capsys, arrays, fragment):
    """An .npz column that is not one real number per sample: one line naming the file and the column, no experiment written."""
    path = tmp_path / "scores.npz"
    np.savez(path, **arrays)
    assert train_main(["import-scores", "table", "--source", str(path), "--scores", "signal", "--experiment", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: {fragment}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "exp").exists()
