"""``train.py export``: re-export every model's outputs from its checkpoint alone (e.g. a farm trained elsewhere).

The experiment's ``config.yaml`` and checkpoints are read as data: the DataModule and model classes
they name must be Lightning subclasses from trusted packages (``mia_lightning`` plus ``--trust``).
Before anything is replaced: every model folder must lie inside the experiment (no symlink out),
every model's recorded recipe must match plan.json, and every new output passes the farm's checks
(finite, one shape for all models, a logit for every label); otherwise nothing is written.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import yaml
from rich.console import Console

from lightning.fabric.utilities.exceptions import MisconfigurationException

from mia_lightning.contract.components import TRUSTED_MODULES, ComponentSpec
from mia_lightning.contract.confine import confined, confined_all
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.checkpoints import load_model_checkpoint
from mia_lightning.farm.engine import predict_logits
from mia_lightning.contract.identity import check_model_identities
from mia_lightning.contract.model_outputs import LOGITS_FILE, SIGNAL_FILE, checked_outputs, save_model_outputs


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
        reason = " ".join(str(err).split())[:200]
        raise MiaError(f"{experiment.config_path}: no usable data section ({reason}); restore the recipe's data: class_path/init_args") from None
    spec = ComponentSpec(str(class_path), init_args, base=L.LightningDataModule, trusted=trusted, root=experiment.root)
    try:
        spec.resolve()  # refuses a non-LightningDataModule or untrusted class before anything is called
    except MiaError as err:
        raise MiaError(f"{experiment.config_path}: data section: {err}") from None
    init_args.pop("train_indices", None)
    if spec.accepts("cache_dir"):  # written by the DataModule (cached features): never through a link leading out
        init_args["cache_dir"] = str(confined(experiment.root, experiment.cache_dir))
    try:
        datamodule = spec.build()
    except MiaError as err:
        raise MiaError(f"{experiment.config_path}: {err}") from None
    return datamodule, dict(config.get("trainer") or {})


def export_experiment(experiment: ExperimentDir, console: Console | None = None, trusted: tuple[str, ...] = TRUSTED_MODULES) -> int:
    """Predict the pool with every checkpoint and (over)write models/NNNN/logits.npy (or signal.npy); returns the count."""
    console = console or Console()
    experiment.check_exists()
    experiment.check_version()
    n_models = experiment.keep.shape[0]
    folders = [experiment.model_dir(i) for i in range(n_models)]
    confined_all(experiment.root, [experiment.models_dir, *folders, *(f / name for f in folders for name in (LOGITS_FILE, SIGNAL_FILE))])
    check_model_identities(experiment)
    datamodule, trainer_args = read_recipe(experiment, trusted)
    if not np.array_equal(np.asarray(datamodule.pool_labels()), experiment.labels):
        raise MiaError(f"{experiment.labels_path}: does not match the labels of the pool in config.yaml; the data changed since training")
    modules = [load_model_checkpoint(experiment.model_dir(i) / "model.ckpt", i, trusted) for i in range(n_models)]
    trainer = export_trainer(experiment, trainer_args)
    outputs = [checked_export(experiment, i, predict_logits(trainer, module, datamodule)) for i, module in enumerate(modules)]
    shapes = {output.shape for output in outputs}
    if len(shapes) > 1:
        raise MiaError(f"{experiment.models_dir}: the checkpoints predict outputs of different shapes {sorted(shapes)}; nothing was replaced, re-train the odd models")
    for index, output in enumerate(outputs):  # written only once every model's outputs passed the checks
        save_model_outputs(experiment.model_dir(index), output)
    console.print(f"[bold]export[/] {experiment.root}: wrote the outputs of {n_models} models")
    return n_models


def export_trainer(experiment: ExperimentDir, trainer_args: dict) -> L.Trainer:
    """A predicting Trainer on the accelerator and precision the farm used (so re-exported logits match); a setting this machine lacks is one line."""
    accelerator, precision = trainer_args.get("accelerator") or "auto", trainer_args.get("precision") or "32-true"
    try:
        return L.Trainer(accelerator=accelerator, precision=precision, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:160]
        raise MiaError(
            f"{experiment.config_path}: trainer.accelerator {accelerator!r} / trainer.precision {precision!r} cannot run here ({reason}); "
            "export on a machine that has it, or edit those two lines of your copy"
        ) from None


def checked_export(experiment: ExperimentDir, index: int, output: np.ndarray) -> np.ndarray:
    """Model ``index``'s new outputs if they pass the farm's checks (finite, one row per sample, a logit for every label); else one line."""
    try:
        array = checked_outputs(index, output)
    except MiaError as err:
        raise MiaError(f"{experiment.model_dir(index) / 'model.ckpt'}: {err}; nothing was replaced") from None
    n_samples = experiment.keep.shape[1]
    if array.shape[0] != n_samples or 0 in array.shape:
        raise MiaError(f"{experiment.model_dir(index) / 'model.ckpt'}: predicts outputs of shape {array.shape} for keep.npy's {n_samples} samples; nothing was replaced")
    if array.ndim == 3 and experiment.labels.size and int(experiment.labels.max()) >= array.shape[-1]:
        raise MiaError(f"{experiment.model_dir(index) / 'model.ckpt'}: predicts {array.shape[-1]} classes but labels.npy has label {int(experiment.labels.max())}; nothing was replaced")
    return array
