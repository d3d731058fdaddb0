"""``train.py study``: a sweep of ordinary experiments (one per setting) and a fitted analysis over them.

A study recipe names a base farm recipe and the settings to sweep, either as a grid of dotted
overrides (cartesian product) or as an explicit list::

    study:
      name: fmnist_power_law
      root: checkpoints
      recipe: recipe:images/fmnist_head      # or a path to a farm recipe
      overrides: {plan.n_models: 16}          # optional: applied to every setting (not part of its name)
      grid: {data.init_args.shots: [1, 2, 4], data.init_args.n_classes: [2, 10]}
      # or a list of grids (their union: e.g. a fitted scenario and the scenarios it predicts)
      # or: settings: [{name: baseline, overrides: {}}, {name: l2, overrides: {model.init_args.weight_decay: 0.01}}]
      attacks: [lira]
      params: {}
      analysis: power_law
      analysis_params: {}

Layout: ``<root>/<name>/study.json`` (the grid and recipe, checked on every resume), one ordinary
experiment per setting under ``settings/<setting>/`` (trained by the farm, audited by one attack
run), and the analysis's ``analysis.json`` plus its plots. Resumable setting by setting: a finished
farm is skipped by the farm itself, an audited setting (``setting.json`` and the attack run it records) is not audited again.
The rows and the analysis read the run each setting's ``setting.json`` records, never ``attacks/latest``,
so an ``attack.py`` run by hand on a setting does not change the study.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jsonargparse import ActionConfigFile, ArgumentParser
from rich.console import Console
from rich.table import Table

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import FORMAT_VERSION, ExperimentDir
from mia_lightning.contract.io import load_json, save_json_atomic
from mia_lightning.contract.confine import confined, plain_name
from mia_lightning.contract.runs import SETTING_FILE, setting_fix

ANALYSES: dict[str, str] = {
    "power_law": "mia_lightning.analysis.power_law:analyse",
    "defences": "mia_lightning.analysis.defences:analyse",
}
"""``study.analysis`` name -> ``module:function(study_dir, rows, **params) -> dict``; a row's ``run_folder`` is the setting's study run."""

RECIPE_DIGEST = "recipe_sha256"
"""study.json's record of the base recipe's content: a recipe edited mid-study would train the remaining settings differently."""


@dataclass
class StudyOptions:
    """What a study sweeps: a base farm recipe, settings (a grid or a list), the attacks and the analysis."""

    name: str = "study"
    root: str = "checkpoints"
    recipe: str = ""
    overrides: dict = field(default_factory=dict)
    grid: dict | list = field(default_factory=dict)
    settings: list = field(default_factory=list)
    attacks: list = field(default_factory=lambda: ["lira"])
    params: dict = field(default_factory=dict)
    n_targets: int | None = None
    analysis: str | None = None
    analysis_params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """One experiment of the study: a folder name and the dotted recipe overrides that make it."""

    name: str
    overrides: dict[str, Any]


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def expand_settings(options: StudyOptions) -> list[Setting]:
    """The study's settings: the explicit list, else the cartesian product of the grid, or the union of the products of a list of grids."""
    if options.settings and options.grid:
        raise MiaError("study: give either grid or settings, not both")
    if options.settings:
        settings = []
        for item in options.settings:
            if not isinstance(item, dict) or "name" not in item:
                raise MiaError(f"study.settings: {item!r} needs a name (and overrides)")
            if not isinstance(item.get("overrides") or {}, dict):
                raise MiaError(f"study.settings {item['name']!r}: overrides must be a mapping of dotted keys to values, got {item['overrides']!r}")
            settings.append(Setting(str(item["name"]), dict(item.get("overrides") or {})))
    elif options.grid:
        grids = options.grid if isinstance(options.grid, list) else [options.grid]
        settings = [setting for number, grid in enumerate(grids) for setting in _grid_settings(grid, "study.grid" if len(grids) == 1 else f"study.grid[{number}]")]
    else:
        raise MiaError("study: needs a grid or a list of settings")
    for setting in settings:
        _check_override_keys(setting.overrides, f"study setting {setting.name!r}")
    _check_override_keys(options.overrides, "study.overrides")
    names = [s.name for s in settings]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise MiaError(f"study.settings: names must be unique, {duplicated[0]!r} repeats")
    for name in names:
        plain_name(name, "study setting name")  # each becomes one folder of the study
    return settings


def _check_override_keys(overrides: dict, where: str) -> None:
    """Overrides may change the recipe, never where a setting's experiment lives (the study places it under its own folder)."""
    for key in overrides:
        if not isinstance(key, str) or key.split(".", 1)[0] in ("experiment", "study"):
            raise MiaError(f"{where}: {key!r} cannot be overridden; the study names and places every setting's experiment itself")


def _grid_settings(grid: Any, where: str) -> list[Setting]:
    """The cartesian product of one grid of dotted overrides, each setting named like ``shots-4_n_classes-10``."""
    if not isinstance(grid, dict) or not grid:
        raise MiaError(f"{where}: expected a mapping of dotted keys to non-empty lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise MiaError(f"{where}.{key}: expected a non-empty list of values")
    keys = list(grid)
    return [Setting("_".join(f"{_leaf(k)}-{v}" for k, v in zip(keys, values)), dict(zip(keys, values)))
            for values in itertools.product(*(grid[k] for k in keys))]


def recipe_file(recipe: str) -> Path:
    """The base farm recipe's file: a path, or a shipped recipe ``recipe:<name>`` (found in a checkout and an installed wheel alike)."""
    from mia_lightning.recipe_files import PREFIX, recipe_path

    if recipe.startswith(PREFIX):
        try:
            return recipe_path(recipe)
        except MiaError as err:
            raise MiaError(f"study.recipe: {err}") from None
    if not recipe or not Path(recipe).is_file():
        raise MiaError(f"study.recipe {recipe!r}: no such farm recipe file (a path, or recipe:<name> for a shipped one)")
    return Path(recipe)


def setting_argv(options: StudyOptions, study_dir: Path, setting: Setting) -> list[str]:
    """The ``train.py farm`` arguments of one setting: the base recipe, its folder, the study's overrides, then the setting's, as dotted flags."""
    argv = ["--config", str(recipe_file(options.recipe)), "--experiment.root", str(study_dir / "settings"), "--experiment.name", setting.name]
    for key, value in {**options.overrides, **setting.overrides}.items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return argv


def study_outputs(options: StudyOptions) -> list[str] | None:
    """The attack outputs the study's attacks write (``lira`` -> ``lira_online``, ...), None when an attack's depend on its run (``unlearning``).

    The attacks and their params are checked first.
    """
    from mia_lightning.attacks import ATTACKS
    from mia_lightning.audit import resolve_attacks

    if not options.attacks:
        raise MiaError("study.attacks: empty; name the attacks that audit every setting, e.g. [lira]")
    try:
        names, _ = resolve_attacks(options.attacks, options.params)
    except MiaError as err:
        raise MiaError(f"study.attacks / study.params: {err}") from None
    declared = ATTACKS.outputs()
    return None if any(name not in declared for name in names) else [output for name in names for output in declared[name]]


def check_setting_recipes(options: StudyOptions, study_dir: Path, settings: list[Setting]) -> None:
    """Parse every setting's farm recipe, build its callbacks and check its plan settings, n_targets and the attacks' n_shadows
    before study.json is written: a typo found later would lock the study to it."""
    from mia_lightning.attacks.shadows import shadow_pool
    from mia_lightning.audit import resolve_targets
    from mia_lightning.console import parse
    from mia_lightning.data.plan import check_plan_spec
    from mia_lightning.farm.config import farm_parser, recipe_from_namespace

    parser = farm_parser()
    for setting in settings:
        try:
            recipe = recipe_from_namespace(parser, parse(parser, setting_argv(options, study_dir, setting)))
            recipe.setup.build_callbacks()  # their constructors check their arguments (DPSGD's epsilon, delta, clipping)
            check_plan_spec(recipe.plan.kind, recipe.plan.n_models, recipe.plan.options)
            resolve_targets(recipe.plan.n_models, None, options.n_targets)
            for attack, params in options.params.items():  # shadows come from the setting's models: more than it has fails only at its audit
                if isinstance(params.get("n_shadows"), int):
                    shadow_pool(recipe.plan.n_models, params["n_shadows"], f"study.params.{attack}.n_shadows")
        except MiaError as err:
            raise MiaError(f"study setting {setting.name!r}: {err}") from None


def analysis_function(name: str) -> Callable[..., dict]:
    if name not in ANALYSES:
        raise MiaError(f"study.analysis {name!r}: unknown; choose one of {', '.join(sorted(ANALYSES))}")
    module, _, function = ANALYSES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _check_analysis_params(analyse: Callable[..., dict], options: StudyOptions, settings: list[Setting], outputs: list[str] | None) -> None:
    """Refuse an analysis parameter the analysis does not take, of the wrong type, or naming no setting or output of the study, before any setting trains (a typo would otherwise cost the whole sweep).

    The analysis module's ``check_params(settings, outputs, **params)``, when it has one, checks the values (``analyse`` calls it too).
    """
    parameters = inspect.signature(analyse).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [name for name in parameters if name not in ("study_dir", "rows")]
    unknown = sorted(set(options.analysis_params) - set(accepted))
    if unknown:
        raise MiaError(f"study.analysis_params.{unknown[0]}: not a parameter of the {options.analysis} analysis; it takes {', '.join(accepted)}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(analyse, skip={"study_dir", "rows"})
    try:
        values = parser.parse_object(options.analysis_params).as_dict()
    except argparse.ArgumentError as err:
        key = next((name for name in options.analysis_params if f'key "{name}"' in str(err)), "?")
        raise MiaError(f"study.analysis_params.{key}={options.analysis_params.get(key)!r}: expected {parameters[key].annotation if key in parameters else 'another type'}") from None
    check = getattr(sys.modules[analyse.__module__], "check_params", None)
    if check is not None:
        check([setting.name for setting in settings], outputs, **values)


def recipe_digest(recipe: str) -> str:
    """sha256 of the base recipe's content (parsed, so comments and layout do not count): study.json records it."""
    import hashlib

    import yaml

    path = recipe_file(recipe)
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MiaError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]}); fix the study's base recipe") from None
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _same_file(stored: Any, recipe: str) -> bool:
    """Whether study.json's recipe and the current one name the same file, however spelled."""
    try:
        return isinstance(stored, str) and recipe_file(stored).resolve() == recipe_file(recipe).resolve()
    except MiaError:
        return False


def _any_setting_planned(study_dir: Path) -> bool:
    """Whether a setting folder under ``settings/`` holds a plan (a farm planned, and maybe trained, it): what study.json protects."""
    return any(ExperimentDir(folder).plan_path.is_file() for folder in (study_dir / "settings").glob("*"))


def _check_study_file(study_dir: Path, payload: dict) -> None:
    """Write study.json, or check that an existing one describes the same study (a study started before the recipe digest was recorded is compared without it).

    A study.json whose settings never got as far as a plan (the first farm refused the recipe, e.g. a negative learning
    rate found only once the model is built) protects nothing: it is replaced, so the corrected study is not locked to the typo.
    """
    path = study_dir / "study.json"
    if path.is_file() and not _any_setting_planned(study_dir):
        save_json_atomic(path, payload)
        return
    if path.is_file():
        stored = load_json(path)
        compared = payload if not isinstance(stored, dict) or RECIPE_DIGEST in stored else {k: v for k, v in payload.items() if k != RECIPE_DIGEST}
        if isinstance(stored, dict) and stored.get("recipe") != payload["recipe"] and _same_file(stored.get("recipe"), payload["recipe"]):
            compared = {**compared, "recipe": stored["recipe"]}  # configs/x.yaml then recipe:x (the shipped studies' spelling) in a checkout
        if stored != compared:
            from mia_lightning.contract.identity import differing_keys

            changed = differing_keys(stored if isinstance(stored, dict) else {}, compared)
            if [key.split(":")[0] for key in changed] == [RECIPE_DIGEST]:
                raise MiaError(f"{path}: the base recipe {payload['recipe']} changed since this study started (its settings would mix recipes); "
                               "restore it or use another study.name")
            raise MiaError(f"{path}: this study was started with other settings ({'; '.join(changed[:4])}); use another study.name")
        return
    save_json_atomic(path, payload)


def study_run(experiment: ExperimentDir) -> tuple[Path, dict] | None:
    """(folder, run.json) of the attack run the study recorded in the setting's marker; None when the setting is not audited or that run is gone.

    The study reads this run, not ``attacks/latest``: an ``attack.py`` run by hand on a setting
    publishes a newer run there and would otherwise change the study's analysis.
    """
    from mia_lightning.contract.runs import run_by_id

    marker = experiment.root / SETTING_FILE
    if not marker.is_file():
        return None
    recorded = load_json(marker)
    return run_by_id(experiment, recorded.get("run") if isinstance(recorded, dict) else None, f"{marker}: run", setting_fix(experiment))


def _row(setting: Setting, experiment: ExperimentDir) -> dict:
    """What the analysis gets about one audited setting: its overrides, folder, the study's attack run, results per output and utility."""
    from mia_lightning.contract.runs import run_results, run_utility

    found, fix = study_run(experiment), setting_fix(experiment)
    if found is None:
        raise MiaError(f"{experiment.root / SETTING_FILE}: the attack run it records is gone; {fix}")
    folder, run = found
    return {"setting": setting.name, "overrides": setting.overrides, "experiment": experiment.root, "run_folder": folder,
            "results": run_results(folder, run, fix=fix), "utility": run_utility(folder, fix)}


def audited(experiment: ExperimentDir) -> bool:
    """Whether the study audited the setting's experiment and the attack run it recorded is still there (a deleted run is audited again)."""
    return study_run(experiment) is not None


def run_study(options: StudyOptions, console: Console, status_only: bool = False) -> dict | None:
    """Train and audit every setting not yet done, then run the analysis; returns its result."""
    from mia_lightning.audit import run_audit
    from mia_lightning.cli import farm_main

    recipe_file(options.recipe)
    settings = expand_settings(options)
    outputs = study_outputs(options)
    if options.analysis_params and not options.analysis:
        raise MiaError(f"study.analysis_params {sorted(options.analysis_params)}: given without study.analysis; name the analysis ({', '.join(sorted(ANALYSES))})")
    analyse = analysis_function(options.analysis) if options.analysis else None
    if analyse is not None:
        _check_analysis_params(analyse, options, settings, outputs)
    plain_name(options.name, "study.name")
    study_dir = Path(options.root) / options.name
    for folder in (Path(options.root), study_dir):
        if folder.exists() and not folder.is_dir():
            raise MiaError(f"{folder}: a file, not a folder; choose another study.root or study.name")
    if ExperimentDir(study_dir).plan_path.is_file():
        raise MiaError(f"{study_dir}: an experiment's folder (plan.json), not a study; choose another study.name or study.root")
    if status_only:
        _print_status(study_dir, settings, console)
        return None
    check_setting_recipes(options, study_dir, settings)
    study_dir.mkdir(parents=True, exist_ok=True)
    payload = {"version": FORMAT_VERSION, "recipe": options.recipe, RECIPE_DIGEST: recipe_digest(options.recipe), **({"overrides": options.overrides} if options.overrides else {}), "settings": [{"name": s.name, "overrides": s.overrides} for s in settings],
               "attacks": list(options.attacks), "params": options.params, "n_targets": options.n_targets}
    _check_study_file(study_dir, payload)
    rows = []
    started, trained = time.perf_counter(), 0
    for number, setting in enumerate(settings, start=1):
        experiment = ExperimentDir(confined(study_dir, study_dir / "settings" / setting.name))
        marker = experiment.root / SETTING_FILE
        if not audited(experiment):
            remaining = sum(not audited(ExperimentDir(study_dir / "settings" / later.name)) for later in settings[number - 1:])
            eta = f", about {(time.perf_counter() - started) / trained * remaining / 60:.0f} min left" if trained else ""
            console.rule(f"study {options.name}: setting {number}/{len(settings)} {setting.name} ({remaining} to train{eta})")
            trained += 1
            try:
                code = farm_main(setting_argv(options, study_dir, setting))
                if code:
                    raise MiaError(f"study {options.name}: the farm of setting {setting.name!r} stopped (exit {code}); re-run the study to resume")
                result = run_audit(experiment.root, options.attacks, n_targets=options.n_targets, params=options.params)
            except MiaError as err:  # a recipe or parameter value found only once the data loads or the models exist: name the setting
                raise err if str(err).startswith(f"study {options.name}:") else MiaError(f"study setting {setting.name!r}: {err}") from None
            save_json_atomic(marker, {"setting": setting.name, "overrides": setting.overrides, "run": result.run_id})
        rows.append(_row(setting, experiment))
    if analyse is None:
        console.print(f"study {options.name}: {len(rows)} settings audited, each run named in {study_dir / 'settings'}/<setting>/{SETTING_FILE}; "
                      f"no study.analysis, so no analysis.json")
        return None
    summary = analyse(study_dir, rows, **options.analysis_params)
    save_json_atomic(study_dir / "analysis.json", summary)
    console.print(f"study {options.name}: {len(rows)} settings; analysis {options.analysis} -> {study_dir / 'analysis.json'}")
    return summary


def _print_status(study_dir: Path, settings: list[Setting], console: Console) -> None:
    """Each setting's state (audited, planned, missing) and how many of its planned models are trained."""
    from mia_lightning.farm.status import pending_models

    table = Table(title=f"study {study_dir}", title_justify="left")
    table.add_column("setting", style="bold")
    table.add_column("state")
    table.add_column("models trained", justify="right")
    for setting in settings:
        experiment = ExperimentDir(study_dir / "settings" / setting.name)
        planned = experiment.plan_path.is_file()
        n_models = experiment.plan["n_models"] if planned else 0
        trained = f"{n_models - len(pending_models(experiment, range(n_models)))} / {n_models}" if planned else "-"
        table.add_row(setting.name, "audited" if audited(experiment) else "planned" if planned else "missing", trained)
    console.print(table)


def main(argv: list[str]) -> int:
    """``train.py study --config <study>.yaml [--status]``."""
    from mia_lightning.console import console, parse

    parser = ArgumentParser(prog="train.py study", description="Run a sweep of experiments and fit the study's analysis.")
    parser.add_argument("--config", action=ActionConfigFile, help="study YAML (see configs/)")
    parser.add_class_arguments(StudyOptions, "study")
    parser.add_argument("--status", action="store_true", help="list which settings are audited, planned or missing and how many of their models are trained, and exit")
    cfg = parse(parser, argv)
    run_study(StudyOptions(**cfg.study.as_dict()), console, status_only=cfg.status)
    return 0
