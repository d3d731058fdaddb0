"""``train.py export``: re-export every model's logits from its checkpoint alone (e.g. a farm trained elsewhere)."""

from __future__ import annotations

import lightning as L
import numpy as np
import yaml
from rich.console import Console

from mia_lightning.errors import MiaError
from mia_lightning.experiment import ExperimentDir
from mia_lightning.farm.checkpoints import load_model_checkpoint
from mia_lightning.farm.engine import ComponentSpec, predict_logits
from mia_lightning.io import save_npy_atomic


def read_recipe(experiment: ExperimentDir) -> tuple[L.LightningDataModule, dict]:
    """The audit pool's DataModule and the trainer section, rebuilt from the experiment's config.yaml."""
    if not experiment.config_path.is_file():
        raise MiaError(f"{experiment.config_path}: missing; export needs the recipe that built the pool (the farm writes it)")
    try:
        config = yaml.safe_load(experiment.config_path.read_text())
        data = config["data"]
        datamodule = ComponentSpec(data["class_path"], data.get("init_args") or {}).build(train_indices=None)
        return datamodule, dict(config.get("trainer") or {})
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise MiaError(f"{experiment.config_path}: no usable data section ({err}); restore the recipe's data: class_path/init_args") from None


def export_experiment(experiment: ExperimentDir, console: Console | None = None) -> int:
    """Predict the pool with every checkpoint and (over)write models/NNNN/logits.npy; returns the count."""
    console = console or Console()
    experiment.check_exists()
    experiment.check_version()
    n_models = experiment.keep.shape[0]
    datamodule, trainer_args = read_recipe(experiment)
    if not np.array_equal(np.asarray(datamodule.pool_labels()), experiment.labels):
        raise MiaError(f"{experiment.labels_path}: does not match the labels of the pool in config.yaml; the data changed since training")
    modules = [load_model_checkpoint(experiment.model_dir(i) / "model.ckpt", i) for i in range(n_models)]
    # predict on the accelerator and precision the farm used, so re-exported logits match the originals
    trainer = L.Trainer(
        accelerator=trainer_args.get("accelerator") or "auto",
        precision=trainer_args.get("precision") or "32-true",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for index, module in enumerate(modules):
        save_npy_atomic(experiment.model_dir(index) / "logits.npy", predict_logits(trainer, module, datamodule))
    console.print(f"[bold]export[/] {experiment.root}: wrote logits of {n_models} models")
    return n_models
