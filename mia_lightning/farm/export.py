"""``train.py export``: re-export every model's outputs from its checkpoint alone (e.g. a farm trained elsewhere).

The experiment's ``config.yaml`` and checkpoints are read as data: the DataModule and model classes
they name must be Lightning subclasses from trusted packages (``mia_lightning`` plus ``--trust``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import yaml
from rich.console import Console

from mia_lightning.contract.components import TRUSTED_MODULES, ComponentSpec
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.checkpoints import load_model_checkpoint
from mia_lightning.farm.engine import predict_logits
from mia_lightning.contract.model_outputs import save_model_outputs


def read_recipe(experiment: ExperimentDir, trusted: tuple[str, ...] = TRUSTED_MODULES) -> tuple[L.LightningDataModule, dict]:
    """The audit pool's DataModule and the trainer section, rebuilt from the experiment's config.yaml."""
    if not experiment.config_path.is_file():
        raise MiaError(f"{experiment.config_path}: missing; export needs the recipe that built the pool (the farm writes it)")
    try:
        config = yaml.safe_load(experiment.config_path.read_text())
        data = config["data"]
        init_args = dict(data.get("init_args") or {})
        class_path = data["class_path"]
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise MiaError(f"{experiment.config_path}: no usable data section ({err}); restore the recipe's data: class_path/init_args") from None
    spec = ComponentSpec(str(class_path), init_args, base=L.LightningDataModule, trusted=trusted)
    try:
        spec.resolve()  # refuses a non-LightningDataModule or untrusted class before anything is called
    except MiaError as err:
        raise MiaError(f"{experiment.config_path}: data section: {err}") from None
    init_args.pop("train_indices", None)
    if spec.accepts("cache_dir"):
        init_args["cache_dir"] = str(experiment.cache_dir)
    return spec.build(), dict(config.get("trainer") or {})


def export_experiment(experiment: ExperimentDir, console: Console | None = None, trusted: tuple[str, ...] = TRUSTED_MODULES) -> int:
    """Predict the pool with every checkpoint and (over)write models/NNNN/logits.npy (or signal.npy); returns the count."""
    console = console or Console()
    experiment.check_exists()
    experiment.check_version()
    n_models = experiment.keep.shape[0]
    datamodule, trainer_args = read_recipe(experiment, trusted)
    if not np.array_equal(np.asarray(datamodule.pool_labels()), experiment.labels):
        raise MiaError(f"{experiment.labels_path}: does not match the labels of the pool in config.yaml; the data changed since training")
    modules = [load_model_checkpoint(experiment.model_dir(i) / "model.ckpt", i, trusted) for i in range(n_models)]
    # predict on the accelerator and precision the farm used, so re-exported logits match the originals
    trainer = L.Trainer(
        accelerator=trainer_args.get("accelerator") or "auto",
        precision=trainer_args.get("precision") or "32-true",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    outputs = [predict_logits(trainer, module, datamodule) for module in modules]  # everything predicted before anything is written
    for index, output in enumerate(outputs):
        save_model_outputs(experiment.model_dir(index), output)
    console.print(f"[bold]export[/] {experiment.root}: wrote the outputs of {n_models} models")
    return n_models
