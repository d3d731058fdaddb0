"""Plans, tabular loading (bundled and CSV), train-only scaling, and the single-model LightningCLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mia_lightning.cli import train_main
from mia_lightning.data.plan import PlanSpec, make_lira_plan, make_plan
from mia_lightning.data.streams import StreamBatchSampler, index_stream
from mia_lightning.data.tabular import TabularDataModule, load_tabular
from mia_lightning.errors import MiaError


@pytest.mark.parametrize("n_models,n_samples", [(64, 1797), (7, 101), (2, 10)])
def test_lira_plan_is_balanced(n_models, n_samples):
    plan = make_lira_plan(PlanSpec("x", n_samples, n_models, seed=3))
    keep, population = plan.keep, plan.population
    per_sample = keep.sum(axis=0)
    assert set(np.unique(per_sample)) <= {n_models // 2, (n_models + 1) // 2}
    assert per_sample.sum() in range(n_samples * (n_models // 2), n_samples * ((n_models + 1) // 2) + 1)
    per_model = keep.sum(axis=1)
    assert per_model.max() - per_model.min() <= 1
    assert population.size == 0


def test_plan_is_reproducible_bit_for_bit_and_seed_dependent():
    spec = PlanSpec("digits", 500, 16, seed=11, n_population=50)
    (keep_a, pop_a), (keep_b, pop_b) = ((plan.keep, plan.population) for plan in (make_lira_plan(spec), make_lira_plan(spec)))
    assert keep_a.tobytes() == keep_b.tobytes() and pop_a.tobytes() == pop_b.tobytes()
    assert not np.array_equal(keep_a, make_lira_plan(PlanSpec("digits", 500, 16, seed=12, n_population=50)).keep)
    assert pop_a.size == 50 and not keep_a[:, pop_a].any()
    audit = np.setdiff1d(np.arange(500), pop_a)
    assert (keep_a[:, audit].sum(axis=0) == 8).all()


def test_bernoulli_plan_flips_independent_fair_coins():
    plan = make_plan(PlanSpec("x", 4000, 32, seed=5, kind="bernoulli", n_population=100))
    audit = np.setdiff1d(np.arange(4000), plan.population)
    assert not plan.keep[:, plan.population].any()
    fraction = plan.keep[:, audit].mean()
    assert abs(fraction - 0.5) < 0.01  # 124,800 flips: 5 standard deviations is 0.007
    per_sample = plan.keep[:, audit].sum(axis=0)
    assert len(np.unique(per_sample)) > 10  # unlike lira_half, the IN count per sample varies (binomial)
    pairs = plan.keep[:, audit].astype(float)
    assert abs(np.corrcoef(pairs[0], pairs[1])[0, 1]) < 0.05


@pytest.mark.parametrize("spec,phrase", [
    (PlanSpec("x", 100, 1), "--plan.n_models 1"),
    (PlanSpec("x", 100, 4, n_population=99), "--plan.n_population 99"),
    (PlanSpec("x", 100, 4, n_population=-1), "--plan.n_population -1"),
    (PlanSpec("x", 100, 4, kind="halves"), "unknown plan kind"),
])
def test_bad_plan_options_are_one_line_errors(spec, phrase):
    with pytest.raises(MiaError, match=phrase):
        make_plan(spec)


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
        ("a,y\nnan,0\n2,1\n", "y", "column 'a' is missing"),
        ("a,y\n1,0\n?,1\n3,1\n", "y", ":3: column 'a' is missing \\('\\?'\\)"),
        ("a,y\n1,0\ninf,1\n3,1\n", "y", "infinite"),
    ],
)
def test_malformed_csv_gives_clear_error(tmp_path, content, label, phrase):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(MiaError, match=phrase) as info:
        load_tabular(str(path), label)
    assert str(path) in str(info.value)


def test_missing_values_are_refused_dropped_or_imputed(tmp_path):
    """'?', empty and NA fields must never turn a numeric column into one-hot categories (6 features becoming 53)."""
    path = tmp_path / "adult_like.csv"
    rows = ["age,workclass,hours,income"] + [f"{20 + i},{['Private', 'State-gov', '?'][i % 3]},{'' if i == 4 else 30 + i % 7},{['<=50K', '>50K'][i % 2]}" for i in range(30)]
    path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")  # with a byte-order mark, as Excel writes it
    with pytest.raises(MiaError, match=r":4: column 'workclass' is missing .* 11 rows have missing values: set data.missing"):
        load_tabular(str(path), "income")
    dropped = load_tabular(str(path), "income", "drop")
    assert dropped.features.shape == (19, 4)  # samples 2, 5, 8, ... ('?' workclass) and 4 (empty hours) dropped
    imputed = load_tabular(str(path), "income", "mean")
    assert imputed.features.shape == (30, 4)  # age, workclass one-hot over the 2 observed values, hours
    hours = np.array([30 + i % 7 for i in range(30) if i != 4], dtype=np.float32)
    assert imputed.features[4, 3] == pytest.approx(hours.mean())
    assert imputed.features[2, 1:3].tolist() == [1.0, 0.0]  # '?' workclass -> the most frequent value (Private)
    with pytest.raises(MiaError, match="data.missing 'zero'"):
        load_tabular(str(path), "income", "zero")


def test_pool_fingerprint_follows_content_not_path(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,y\n1,0\n2,1\n3,0\n")
    before = load_tabular(str(path), "y").fingerprint()
    load_tabular.cache_clear()
    path.write_text("a,y\n1,0\n2,1\n4,0\n")  # same path, same rows, one value edited
    assert load_tabular(str(path), "y").fingerprint() != before
    load_tabular.cache_clear()


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
    with warnings.catch_warnings(record=True) as caught:  # LightningCLI warned on every run that it got argv twice (ours and sys.argv)
        warnings.simplefilter("always")
        assert train_main(["fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]) == 0
    assert not [w for w in caught if "LightningCLI's args parameter" in str(w.message)]


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
