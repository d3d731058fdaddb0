"""Plans, tabular loading (bundled and CSV), train-only scaling, and the single-model LightningCLI."""

from __future__ import annotations

import numpy as np
import pytest

from mia_lightning.cli import train_main
from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.data.streams import StreamBatchSampler, index_stream
from mia_lightning.data.tabular import TabularDataModule, load_tabular
from mia_lightning.errors import MiaError


@pytest.mark.parametrize("n_models,n_samples", [(64, 1797), (7, 101), (2, 10)])
def test_lira_plan_is_balanced(n_models, n_samples):
    keep, population = make_lira_plan(PlanSpec("x", n_samples, n_models, seed=3))
    per_sample = keep.sum(axis=0)
    assert set(np.unique(per_sample)) <= {n_models // 2, (n_models + 1) // 2}
    assert per_sample.sum() in range(n_samples * (n_models // 2), n_samples * ((n_models + 1) // 2) + 1)
    per_model = keep.sum(axis=1)
    assert per_model.max() - per_model.min() <= 1
    assert population.size == 0


def test_plan_is_reproducible_bit_for_bit_and_seed_dependent():
    spec = PlanSpec("digits", 500, 16, seed=11, n_population=50)
    keep_a, pop_a = make_lira_plan(spec)
    keep_b, pop_b = make_lira_plan(spec)
    assert keep_a.tobytes() == keep_b.tobytes() and pop_a.tobytes() == pop_b.tobytes()
    assert not np.array_equal(keep_a, make_lira_plan(PlanSpec("digits", 500, 16, seed=12, n_population=50))[0])
    assert pop_a.size == 50 and not keep_a[:, pop_a].any()
    audit = np.setdiff1d(np.arange(500), pop_a)
    assert (keep_a[:, audit].sum(axis=0) == 8).all()


def test_bundled_sets_load():
    digits = load_tabular("digits")
    assert digits.features.shape == (1797, 64) and digits.n_classes == 10
    assert load_tabular("breast_cancer").features.shape == (569, 30)


def test_csv_with_categorical_columns(tmp_path):
    path = tmp_path / "people.csv"
    rows = ["age,workclass,hours,income"] + [f"{20 + i},{['Private', 'State-gov'][i % 2]},{30 + i % 7},{['<=50K', '>50K'][i % 3 == 0]}" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    pool = load_tabular(str(path), "income")
    assert pool.features.shape == (30, 4)  # age, 2 one-hot workclass, hours
    assert pool.class_names == ("<=50K", ">50K") and pool.labels[0] == 1


@pytest.mark.parametrize(
    "content,label,phrase",
    [
        ("a,b\n1,2\n3,4\n", "y", "no label column 'y'"),
        ("a,y\n1,0\n3\n2,1\n", "y", ":3: 1 fields"),
        ("a,y\n1,0\n2,0\n", "y", "single value"),
        ("a,y\nnan,0\n2,1\n", "y", "NaN"),
    ],
)
def test_malformed_csv_gives_clear_error(tmp_path, content, label, phrase):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(MiaError, match=phrase) as info:
        load_tabular(str(path), label)
    assert str(path) in str(info.value)


def test_missing_csv_and_missing_label_column():
    with pytest.raises(MiaError, match="no such CSV"):
        load_tabular("/nonexistent/data.csv", "y")
    with pytest.raises(MiaError, match="label_column"):
        load_tabular("/nonexistent/data.csv")


def test_scaling_uses_the_training_subset_only():
    dm = TabularDataModule("breast_cancer", train_indices=list(range(100)))
    mean, std = dm.train_feature_stats()
    features = load_tabular("breast_cancer").features[:100].astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), features.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), features.std(0), rtol=1e-5)
    assert not np.allclose(mean.numpy(), load_tabular("breast_cancer").features.mean(0), rtol=1e-3)


def test_stream_sampler_epochs_are_consecutive_slices_of_one_stream():
    train = np.arange(10, 40)
    sampler = StreamBatchSampler(train, batch_size=8, seed=5)
    epochs = [list(sampler) for _ in range(3)]
    assert len(epochs[0]) == 4 and all(len(batch) == 8 for batch in epochs[0])
    stream = index_stream(train, 8, 12, seed=5).tolist()
    assert sum(epochs, []) == stream
    assert set(sum(stream[:4], [])) <= set(train.tolist())


def test_fit_subcommand_trains_one_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs/tabular/mlp_fit.yaml"
    assert train_main(["fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]) == 0


def test_stream_sampler_splits_batches_across_ddp_ranks():
    train = np.arange(50)
    single = list(StreamBatchSampler(train, 8, seed=2))
    ranks = [list(StreamBatchSampler(train, 8, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(batch) for batch in single]


def test_fit_with_lightning_ddp_on_two_cpu_processes(tmp_path):
    """A single large model trains with Lightning DDP through the plain LightningCLI."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), "fit", "--config", str(root / "configs/tabular/mlp_fit.yaml"),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "checkpoints/mlp_fit/config.yaml").is_file()
