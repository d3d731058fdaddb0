"""An experiment is one thing: every process training into it must share the recipe identity, data content included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from mia_lightning.cli import train_main
from mia_lightning.data.tabular import load_tabular

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tabular/digits_sequential.yaml"


def farm_args(root: Path, *extra: str, source: str | None = None) -> list[str]:
    args = ["farm", "--config", str(RECIPE), "--experiment.root", str(root), "--experiment.name", "exp", "--plan.n_models", "4",
            "--trainer.max_epochs", "2", "--model.init_args.hidden", "[8]", "--trainer.enable_progress_bar", "false"]
    if source:
        args += ["--data.init_args.source", source, "--data.init_args.label_column", "y"]
    return args + list(extra)


def test_a_shard_with_other_trainer_settings_is_refused_naming_the_keys(tmp_path, capsys):
    assert train_main(farm_args(tmp_path, "--farm.shard", "0/2")) == 0
    capsys.readouterr()
    code = train_main(farm_args(tmp_path, "--farm.shard", "1/2", "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed"))
    err = capsys.readouterr().err
    assert code == 2
    assert "recipe.trainer.max_epochs: 2 -> 1" in err and "recipe.trainer.precision: <absent> -> 'bf16-mixed'" in err, err
    assert not list((tmp_path / "exp/models").glob("000[13]/done.json"))  # shard 1 trained nothing


def test_where_a_model_trains_is_not_part_of_its_identity(tmp_path):
    assert train_main(farm_args(tmp_path, "--farm.shard", "0/2")) == 0
    assert train_main(farm_args(tmp_path, "--farm.shard", "1/2", "--trainer.enable_model_summary", "false", "--farm.engine", "vectorised")) == 0
    assert len(list((tmp_path / "exp/models").glob("*/done.json"))) == 4


def write_csv(path: Path, shift: float = 0.0) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6))
    y = (x[:, 0] > 0).astype(int)
    x[0, 0] += shift
    rows = ["f0,f1,f2,f3,f4,f5,y"] + [",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")


def test_a_csv_edited_in_place_between_shards_is_refused(tmp_path, capsys):
    data = tmp_path / "data.csv"
    write_csv(data)
    assert train_main(farm_args(tmp_path, "--farm.shard", "0/2", source=str(data))) == 0
    write_csv(data, shift=1.0)  # same path, same rows, one value changed
    load_tabular.cache_clear()
    capsys.readouterr()
    assert train_main(farm_args(tmp_path, "--farm.shard", "1/2", source=str(data))) == 2
    assert "recipe.pool_fingerprint" in capsys.readouterr().err
    load_tabular.cache_clear()


def test_recorded_model_arguments_are_the_ones_the_data_decided(tmp_path):
    data = tmp_path / "data.csv"
    write_csv(data)
    assert train_main(farm_args(tmp_path, source=str(data))) == 0
    config = yaml.safe_load((tmp_path / "exp/config.yaml").read_text())
    plan = json.loads((tmp_path / "exp/plan.json").read_text())
    assert config["model"]["init_args"]["n_features"] == 6 and config["model"]["init_args"]["n_classes"] == 2
    assert plan["recipe"]["model"]["init_args"]["n_features"] == 6
    assert plan["recipe"]["trainer"]["max_epochs"] == 2 and "enable_progress_bar" not in plan["recipe"]["trainer"]
    load_tabular.cache_clear()
