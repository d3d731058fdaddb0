"""The Python API: the functions ``train.py`` / ``attack.py`` call, for notebooks and pipelines.

    import mia_lightning as mia

    experiment = mia.train("recipe:tabular/digits_quickstart")        # or a YAML path, or a dict
    records = mia.audit(experiment, attacks=["lira"], n_targets=8)    # one Record per attack output
    mia.open_experiment("checkpoints/digits_quickstart").dataframe()  # the published run (pandas)

Each call does what the command line does (same checks, same files, same run folders) and raises
``MiaError`` with the same one-line message the command line prints; nothing already written is
touched by a refused request. Importing this module does not import torch: that happens when a
request has been checked and work starts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir


@dataclass(frozen=True)
class Record:
    """One attack output of a published run, read from its ``results.json`` (``results`` holds the whole file).

    Intervals are 95%: ``auc_ci`` and ``tpr_ci`` the two-way bootstrap over targets and samples (the
    ones to quote; None when the run had ``bootstrap=0``), ``tpr_ci_clopper_pearson`` over pairs (too
    narrow when pairs share models or samples). A TPR at an FPR level below ``min_resolvable_fpr`` is
    decided by ties (``resolved`` is False for it). ``utility`` is the run's target-model utility.
    """

    attack: str
    family: str
    auc: float
    auc_ci: tuple[float, float] | None
    balanced_accuracy: float
    tpr_at_fpr: dict[float, float]
    tpr_ci: dict[float, tuple[float, float]] | None
    tpr_ci_clopper_pearson: dict[float, tuple[float, float]]
    min_resolvable_fpr: float
    resolved: dict[float, bool]
    epsilon_lower_bound: float | None
    epsilon: dict[str, Any]
    n_members: int
    n_nonmembers: int
    targets: list[int]
    run_id: str
    utility: dict[str, float] | None = None
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_results(cls, results: dict[str, Any], utility: dict[str, Any] | None = None) -> "Record":
        """A record from one results.json payload (and the run's utility.json, when it has one)."""
        boot = results.get("tpr_at_fpr_ci_bootstrap") or {}
        levels = [float(level) for level in results["tpr_at_fpr"]]
        eps = results.get("empirical_epsilon") or {}
        return cls(
            attack=results["attack"],
            family=results.get("family", results["attack"]),
            auc=results["auc"],
            auc_ci=tuple(results["auc_ci_bootstrap"]) if results.get("auc_ci_bootstrap") else None,
            balanced_accuracy=results["balanced_accuracy"],
            tpr_at_fpr={level: results["tpr_at_fpr"][str(level)] for level in levels},
            tpr_ci={level: tuple(boot[str(level)]) for level in levels} if boot else None,
            tpr_ci_clopper_pearson={level: tuple(results["tpr_at_fpr_ci"][str(level)]) for level in levels},
            min_resolvable_fpr=results.get("min_resolvable_fpr", 0.0),
            resolved={level: level >= results.get("min_resolvable_fpr", 0.0) for level in levels},
            epsilon_lower_bound=eps.get("epsilon_lower_bound"),
            epsilon=eps,
            n_members=results["n_members"],
            n_nonmembers=results["n_nonmembers"],
            targets=list(results["targets"]),
            run_id=(results.get("run") or {}).get("id", ""),
            utility=None if utility is None else {key: utility[key] for key in ("test_accuracy", "train_accuracy", "train_test_gap")},
            results=results,
        )

    def row(self) -> dict[str, Any]:
        """The record as one flat table row (a DataFrame row): ``tpr@0.001``, ``tpr@0.001_low`` / ``_high`` (bootstrap), ..."""
        row: dict[str, Any] = {"attack": self.attack, "family": self.family, "auc": self.auc,
                               "auc_low": self.auc_ci[0] if self.auc_ci else None, "auc_high": self.auc_ci[1] if self.auc_ci else None,
                               "balanced_accuracy": self.balanced_accuracy}
        for level, value in self.tpr_at_fpr.items():
            bounds = (self.tpr_ci or {}).get(level)
            row |= {f"tpr@{level:g}": value, f"tpr@{level:g}_low": bounds[0] if bounds else None,
                    f"tpr@{level:g}_high": bounds[1] if bounds else None, f"tpr@{level:g}_resolved": self.resolved[level]}
        row |= {"min_resolvable_fpr": self.min_resolvable_fpr, "epsilon_lower_bound": self.epsilon_lower_bound,
                "n_members": self.n_members, "n_nonmembers": self.n_nonmembers, "n_targets": len(self.targets), "run_id": self.run_id}
        return row | {f"utility_{key}": value for key, value in (self.utility or {}).items()}


def to_dataframe(records: Sequence[Record]) -> Any:
    """The records as a pandas DataFrame (one row per attack output, ``Record.row`` columns); needs pandas."""
    try:
        import pandas
    except ImportError:
        raise MiaError("to_dataframe: needs pandas; install it with `pip install 'mia-lightning[api]'` (or use the records)") from None
    return pandas.DataFrame([record.row() for record in records])


def read_run(run_folder: Path) -> list[Record]:
    """The records of one run folder (``attacks/runs/<id>``), in the run's order."""
    from mia_lightning.contract.runs import read_run_file, rerun_fix, run_results, run_utility
    from mia_lightning.metrics import FPR_LEVELS

    run_folder = Path(run_folder)
    run = read_run_file(run_folder)
    results = run_results(run_folder, run, FPR_LEVELS)
    if not results:
        raise MiaError(f"{run_folder}: the run has no attack results; run `python attack.py --experiment ...` with an attack")
    utility = run_utility(run_folder, rerun_fix(run_folder, run))
    return [Record.from_results(record, utility) for record in results.values()]


@dataclass(frozen=True)
class Experiment:
    """An experiment directory (``checkpoints/<name>``) and its published attack run."""

    root: Path

    @property
    def directory(self) -> ExperimentDir:
        return ExperimentDir(self.root)

    def run_folder(self) -> Path:
        """The published run's folder (``attacks/runs/<id>``); a one-line error when there is none."""
        from mia_lightning.contract.runs import latest_run

        return latest_run(self.directory)[0]

    @property
    def run_id(self) -> str:
        return self.run_folder().name

    def records(self) -> list[Record]:
        """One ``Record`` per attack output of the published run."""
        return read_run(self.run_folder())

    def dataframe(self) -> Any:
        """The published run as a pandas DataFrame (needs pandas)."""
        return to_dataframe(self.records())

    def audit(self, attacks: Sequence[str] = ("lira",), **options: Any) -> list[Record]:
        """``audit(self, attacks, **options)``."""
        return audit(self, attacks, **options)

    def report(self) -> dict[str, Path]:
        """Write ``report.md`` and ``report.html`` from the published run; returns their paths."""
        return write_reports(self.root)


def open_experiment(path: str | Path) -> Experiment:
    """An existing experiment directory; a one-line ``MiaError`` when it is not one."""
    experiment = Experiment(Path(path))
    experiment.directory.check_exists()
    return experiment


def _root(experiment: Experiment | str | Path) -> Path:
    return experiment.root if isinstance(experiment, Experiment) else Path(experiment)


def audit(
    experiment: Experiment | str | Path,
    attacks: Sequence[str] = ("lira",),
    *,
    targets: Sequence[int] | None = None,
    n_targets: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    bootstrap: int | None = None,
    few_shadow: bool = False,
    keep_runs: int | None = None,
    user_reduce: str = "mean",
    fpr_budget: float = 0.1,
    threshold_rule: str = "budget",
    logger: Any = None,
) -> list[Record]:
    """Run attacks on an experiment as one published run (``attack.py``'s options, same checks); returns its records.

    ``logger``: ``"csv"``, ``"tensorboard"``, ``"mlflow"`` or any Lightning logger: receives every
    output's metrics and the ROC figure. ``bootstrap``: replicates of the two-way bootstrap (None: 100); ``keep_runs``: keep
    the N newest runs (None or 0: every run). Options of the wrong type raise ``MiaError`` as the command line words it.
    """
    from mia_lightning.audit import Decisions, run_audit
    from mia_lightning.metrics import BOOTSTRAP_REPLICATES

    if isinstance(attacks, str):
        attacks = [attacks]
    result = run_audit(_root(experiment), list(attacks), targets=targets, n_targets=n_targets, params=params or {},
                       bootstrap=BOOTSTRAP_REPLICATES if bootstrap is None else bootstrap, few_shadow=few_shadow, keep_runs=keep_runs,
                       decisions=Decisions(user_reduce, fpr_budget, threshold_rule), logger=logger)
    return read_run(result.folder)


def train(recipe: str | Path | dict[str, Any], *overrides: str) -> Experiment:
    """Train the farm of a recipe (``train.py farm --config <recipe> [overrides]``); returns its experiment.

    ``recipe``: a YAML path, ``"recipe:<name>"`` (a shipped recipe, see ``recipes()``) or a dict with
    the same keys as a recipe file. ``overrides``: command-line style options, e.g.
    ``"--plan.n_models", "8"``. Resumable like the command: finished models are kept.
    """
    from mia_lightning.cli import train_farm
    from mia_lightning.recipe_files import expand_recipe_args

    if isinstance(recipe, dict):
        import yaml

        with tempfile.TemporaryDirectory(prefix="mia-recipe-") as folder:
            path = Path(folder) / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            code, root = train_farm(["--config", str(path), *overrides])
    else:
        code, root = train_farm(expand_recipe_args(["--config", str(recipe), *overrides]))
    if code:
        raise MiaError(f"{root}: the farm's workers exited with status {code}; re-run the same call to resume")
    return Experiment(Path(root))


def recipes() -> list[str]:
    """Names of the recipes shipped with the package (pass ``"recipe:<name>"`` to ``train``)."""
    from mia_lightning.recipe_files import list_recipes

    return list_recipes()


def write_reports(experiment: Experiment | str | Path) -> dict[str, Path]:
    """``report.md`` and ``report.html`` of the published run (``attack.py --report``); returns their paths."""
    from mia_lightning.report.files import write_reports as write_report_files

    return write_report_files(_root(experiment))


__all__ = ["Experiment", "Record", "audit", "open_experiment", "read_run", "recipes", "to_dataframe", "train", "write_reports"]
