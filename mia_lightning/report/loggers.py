"""Send an audit to experiment tracking: every output's metrics and the ROC figure to a Lightning logger.

``attack.py --logger csv|tensorboard|mlflow`` (or ``audit(..., logger=...)`` with those names or any
``lightning.pytorch.loggers.Logger`` instance) logs, after the run is published: the run's
hyper-parameters (run id, attacks, targets, parameters) and, per output, ``<output>/auc`` with its
bootstrap interval, balanced accuracy, TPR@FPR with both intervals, the resolution and the empirical
epsilon bound, all at step 0. The ROC figure goes where each tracker keeps images: TensorBoard
``add_image``, an MLflow artifact, or ``roc.png`` beside the CSV logger's ``metrics.csv``. Logs of a
named logger are written under ``<experiment>/logs/``, version = the run id (MLflow: the server in
``MLFLOW_TRACKING_URI`` when set, else a file store ``<experiment>/logs/mlruns``). TensorBoard and MLflow are optional extras; a missing one is one line naming it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from mia_lightning.contract.confine import confined
from mia_lightning.contract.io import check_writable_folder
from mia_lightning.errors import MiaError
from mia_lightning.metrics import FPR_LEVELS

LOGGER_EXTRAS: dict[str, tuple[str, str]] = {"csv": ("", ""), "tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
"""Logger name -> (module it needs, the extra that installs it)."""


def check_logger(logger: Any) -> None:
    """Refuse an unknown logger name, or one whose optional package is missing, in one line (before any work)."""
    if logger is None or not isinstance(logger, str):
        return
    if logger not in LOGGER_EXTRAS:
        raise MiaError(f"--logger {logger!r}: choose one of {', '.join(LOGGER_EXTRAS)}")
    module, extra = LOGGER_EXTRAS[logger]
    if module and importlib.util.find_spec(module) is None:
        raise MiaError(f"--logger {logger}: needs the {module} package; install it with `pip install 'mia-lightning[{extra}]'`")


def local_log_folder(logger: str, experiment_root: Path) -> Path | None:
    """Where a logger named by its kind writes in the experiment: ``logs/audit`` (CSV, TensorBoard), ``logs/mlruns`` (MLflow without a tracking server), else None.

    The folder must stay inside the experiment: a ``logs`` (or ``logs/audit``) link leading out of it is refused with one line.
    """
    if logger == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return confined(Path(experiment_root), Path(experiment_root) / "logs" / ("mlruns" if logger == "mlflow" else "audit"))


def check_logger_folder(logger: Any, experiment_root: Path) -> None:
    """Refuse, before the run, a logger named by its kind whose folder in the experiment cannot be made or written."""
    folder = local_log_folder(logger, experiment_root) if isinstance(logger, str) else None
    if folder is not None:
        check_writable_folder(folder, f"--logger {logger}'s logs")


def make_logger(logger: Any, experiment_root: Path, run_id: str) -> Any:
    """A Lightning logger from a name in ``LOGGER_EXTRAS`` (writing under ``<experiment>/logs``), or ``logger`` itself."""
    if not isinstance(logger, str):
        from lightning.pytorch.loggers import Logger

        if not isinstance(logger, Logger):
            raise MiaError(f"logger {logger!r}: expected one of {', '.join(LOGGER_EXTRAS)} or a lightning.pytorch.loggers.Logger")
        return logger
    check_logger(logger)
    from lightning.pytorch import loggers

    folder = local_log_folder(logger, experiment_root)
    if logger == "csv":
        return loggers.CSVLogger(folder.parent, name=folder.name, version=run_id)
    if logger == "tensorboard":
        return loggers.TensorBoardLogger(folder.parent, name=folder.name, version=run_id, default_hp_metric=False)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")  # the user's tracking server, as MLflow itself reads it
    if folder is not None:  # else a local file store in the experiment (MLflow 3 wants an explicit opt-in for one)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking_uri = folder.resolve().as_uri()
    return loggers.MLFlowLogger(experiment_name="audit", run_name=run_id, tracking_uri=tracking_uri)


def record_metrics(record: dict) -> dict[str, float]:
    """The flat ``<output>/<metric>`` numbers of one results.json record (intervals as ``_low`` / ``_high``)."""
    name = record["attack"]
    metrics = {f"{name}/auc": record["auc"], f"{name}/balanced_accuracy": record["balanced_accuracy"],
               f"{name}/min_resolvable_fpr": record["min_resolvable_fpr"]}
    if record.get("auc_ci_bootstrap"):
        metrics |= {f"{name}/auc_low": record["auc_ci_bootstrap"][0], f"{name}/auc_high": record["auc_ci_bootstrap"][1]}
    for level in map(str, FPR_LEVELS):
        metrics[f"{name}/tpr_at_fpr_{level}"] = record["tpr_at_fpr"][level]
        bounds = (record.get("tpr_at_fpr_ci_bootstrap") or {}).get(level)
        if bounds:
            metrics |= {f"{name}/tpr_at_fpr_{level}_bootstrap_low": bounds[0], f"{name}/tpr_at_fpr_{level}_bootstrap_high": bounds[1]}
    eps = (record.get("empirical_epsilon") or {}).get("epsilon_lower_bound")
    if eps is not None:
        metrics[f"{name}/epsilon_lower_bound"] = eps
    return {key: float(value) for key, value in metrics.items()}


def log_audit(logger: Any, records: list[dict], run_folder: Path, run: dict) -> None:
    """Log one published run: hyper-parameters, every output's metrics (step 0) and the ROC figure."""
    logger.log_hyperparams({"run_id": run["id"], "attacks": ",".join(run["attacks"]), "targets": len(run["targets"]),
                            "params": str(run["params"]), "mia_lightning_version": run["version"]})
    for record in records:
        logger.log_metrics(record_metrics(record), step=0)
    roc = Path(run_folder) / "roc.png"
    _log_figure(logger, roc)
    logger.finalize("success")


def _log_figure(logger: Any, png: Path) -> None:
    from lightning.pytorch import loggers

    if isinstance(logger, loggers.TensorBoardLogger):
        import matplotlib.image

        logger.experiment.add_image("roc", matplotlib.image.imread(png)[..., :3], dataformats="HWC")
    elif isinstance(logger, loggers.MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(png))
    elif isinstance(logger, loggers.CSVLogger):
        Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(logger.log_dir) / png.name)
