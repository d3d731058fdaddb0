"""Bad experiment directories: one-line error naming the file, exit code 2, nothing overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mia_lightning.cli import attack_main

ROOT = Path(__file__).resolve().parents[1]


def write_experiment(root: Path, n_models: int = 6, n_samples: int = 40, n_classes: int = 3, seed: int = 0) -> Path:
    """A foreign-exporter experiment: keep.npy, labels.npy and models/*/logits.npy only."""
    rng = np.random.default_rng(seed)
    keep = np.zeros((n_models, n_samples), dtype=bool)
    for j in range(n_samples):
        keep[rng.permutation(n_models)[: n_models // 2], j] = True
    labels = rng.integers(0, n_classes, n_samples)
    root.mkdir(parents=True)
    np.save(root / "keep.npy", keep)
    np.save(root / "labels.npy", labels)
    for m in range(n_models):
        logits = rng.normal(size=(n_samples, 1, n_classes)).astype(np.float32)
        logits[np.arange(n_samples), 0, labels] += 2.0 * keep[m]
        (root / "models" / f"{m:04d}").mkdir(parents=True)
        np.save(root / "models" / f"{m:04d}" / "logits.npy", logits)
    return root


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    """One audited experiment for the module; each test damages its own copy (an audit per test cost ~3 s)."""
    root = write_experiment(tmp_path_factory.mktemp("audited") / "exp")
    assert attack_main(["--experiment", str(root), "--attack", "lira"]) == 0
    return root


@pytest.fixture
def experiment(audited: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(audited, tmp_path / "exp", symlinks=True))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "attacks").rglob("*")) if p.is_file()}


def corrupt_nan(root: Path) -> None:
    logits = np.load(root / "models/0002/logits.npy")
    logits[5, 0, 1] = np.nan
    np.save(root / "models/0002/logits.npy", logits)


def corrupt_shape(root: Path) -> None:
    np.save(root / "models/0001/logits.npy", np.zeros((39, 1, 3), dtype=np.float32))


def truncate_keep(root: Path) -> None:
    data = (root / "keep.npy").read_bytes()
    (root / "keep.npy").write_bytes(data[: len(data) // 2])


def labels_out_of_range(root: Path) -> None:
    labels = np.load(root / "labels.npy")
    labels[0] = 7
    np.save(root / "labels.npy", labels)


def labels_wrong_length(root: Path) -> None:
    np.save(root / "labels.npy", np.zeros(41, dtype=np.int64))


def missing_logits(root: Path) -> None:
    (root / "models/0003/logits.npy").unlink()


def garbage_logits(root: Path) -> None:
    (root / "models/0004/logits.npy").write_bytes(b"not a numpy file at all")


def foreign_version(root: Path) -> None:
    (root / "plan.json").write_text(json.dumps({"version": 99}))


def plan_json(**fields) -> callable:
    """A corruption writing a layout-2 plan.json with ``fields``."""
    return lambda root: (root / "plan.json").write_text(json.dumps({"version": 2, **fields}))


def extra_model_folder(root: Path) -> None:
    (root / "models/0006").mkdir()
    np.save(root / "models/0006/logits.npy", np.load(root / "models/0005/logits.npy"))


CASES = {
    "nan": (corrupt_nan, "models/0002/logits.npy", "NaN/inf"),
    "shape": (corrupt_shape, "models/0001/logits.npy", "shape"),
    "truncated keep": (truncate_keep, "keep.npy", "unreadable"),
    "label range": (labels_out_of_range, "labels.npy", "out of range"),
    "label length": (labels_wrong_length, "labels.npy", "41 labels"),
    "missing logits": (missing_logits, "models/0003/logits.npy", "missing"),
    "garbage logits": (garbage_logits, "models/0004/logits.npy", "unreadable"),
    "version": (foreign_version, "plan.json", "version 99"),
    "info a list": (plan_json(info=[1]), "plan.json", "info [1]: expected a JSON object"),
    "info a number": (plan_json(info=5), "plan.json", "info 5: expected a JSON object"),
    "reference model not an id": (plan_json(info={"reference_models": ["x"]}), "plan.json", "info.reference_models ['x']: expected a list of distinct model ids in 0..5"),
    "reference models a number": (plan_json(info={"reference_models": 5}), "plan.json", "info.reference_models 5: expected a list"),
    "reference model out of range": (plan_json(info={"reference_models": [6]}), "plan.json", "in 0..5"),
    "parents a list": (plan_json(parents=[1]), "plan.json", "parents [1]: expected an object"),
    "parent out of range": (plan_json(parents={"5": 9}), "plan.json", "parents {'5': 9}: expected an object"),
    "unknown kind": (plan_json(kind="bogus"), "plan.json", "kind 'bogus': expected one of"),
    "kind a number": (plan_json(kind=5), "plan.json", "kind 5: expected one of"),
    "recipe a string": (plan_json(recipe="x"), "plan.json", "recipe 'x': expected a JSON object"),
    "more planned models": (plan_json(n_models=8), "keep.npy", "6 models x 40 samples, but"),
    "fewer planned samples": (plan_json(n_models=6, n_samples=100), "plan.json", "plans n_samples 100"),
    "model folder beyond keep": (extra_model_folder, "models/0006", "beyond the 6 rows of"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_experiment_fails_cleanly_and_keeps_results(case, experiment, capsys):
    corrupt, file_named, phrase = CASES[case]
    before = snapshot(experiment)
    capsys.readouterr()
    corrupt(experiment)
    assert attack_main(["--experiment", str(experiment), "--attack", "lira"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and file_named in err and phrase in err, err
    assert "Traceback" not in err
    assert snapshot(experiment) == before


def test_missing_directory_and_bad_targets(tmp_path, experiment, capsys):
    assert attack_main(["--experiment", str(tmp_path / "nope")]) == 2
    assert "no such experiment directory" in capsys.readouterr().err
    assert attack_main(["--experiment", str(experiment), "--targets", "0", "9"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_process_exit_code_and_single_line(experiment):
    corrupt_nan(experiment)
    proc = subprocess.run([sys.executable, "attack.py", "--experiment", str(experiment), "--attack", "lira"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1 and "models/0002/logits.npy" in proc.stderr


def test_foreign_exporter_directory_with_targets(experiment):
    results = json.loads((experiment / "attacks/lira_online/results.json").read_text())
    for key in ("attack", "params", "targets", "n_members", "n_nonmembers", "auc", "balanced_accuracy", "tpr_at_fpr", "tpr_at_fpr_ci"):
        assert key in results
    assert set(results["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert np.load(experiment / "attacks/lira_online/scores.npy").shape == (6, 40)
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--targets", "0", "2", "5"]) == 0
    assert json.loads((experiment / "attacks/lira_offline/results.json").read_text())["targets"] == [0, 2, 5]
    scores = np.load(experiment / "attacks/lira_offline/scores.npy")
    assert scores.shape == (3, 40) and scores.dtype == np.float64


def test_signal_only_experiment_runs_lira(tmp_path, capsys):
    """Families without class logits (e.g. an MLM's negative loss) export signal.npy [n, Q] instead."""
    root = write_experiment(tmp_path / "sig")
    labels = np.load(root / "labels.npy")
    for folder in sorted((root / "models").iterdir()):
        logits = np.load(folder / "logits.npy")
        np.save(folder / "signal.npy", logits[np.arange(labels.size), :, labels].astype(np.float64))
        (folder / "logits.npy").unlink()
    assert attack_main(["--experiment", str(root), "--attack", "lira"]) == 0
    assert json.loads((root / "attacks/lira_online/results.json").read_text())["auc"] > 0.5


def test_a_checkpoint_with_a_numpy_hyper_parameter_names_the_refused_global_and_the_fix(tmp_path):
    """Retraining would write the same unloadable file, so the message must say what to change, not "re-train"."""
    from mia_lightning.errors import MiaError
    from mia_lightning.farm.checkpoints import load_model_checkpoint, save_model_checkpoint
    from mia_lightning.models.tabular_mlp import TabularMLP

    model = TabularMLP(n_features=4, n_classes=2, hidden=[3])
    model.hparams["lr"] = np.float64(0.01)  # as a user's module might store a value it computed with numpy
    save_model_checkpoint(model, tmp_path / "model.ckpt", 0, "exp")
    with pytest.raises(MiaError) as raised:
        load_model_checkpoint(tmp_path / "model.ckpt", 0)
    message = str(raised.value)
    assert "a weights-only load refuses GLOBAL numpy" in message and "plain Python value" in message and "\n" not in message
