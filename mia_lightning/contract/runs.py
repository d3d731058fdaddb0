"""Attack runs as units: one ``attack.py`` invocation writes one run folder, published all at once.

Layout under ``<experiment>/attacks/``::

    runs/<run id>/run.json            what the run was: id, time, attacks, targets, parameters, version
    runs/<run id>/<output>/results.json, scores.npy, roc.png
    runs/<run id>/roc.png (headline outputs), roc_all.png (every output), few_shadow/, utility.json ...
    latest -> runs/<run id>           the published run (a symlink, replaced atomically)
    <entry> -> latest/<entry>         convenience links: attacks/lira_online/results.json etc.

A run is written into ``runs/.staging-<id>/`` and renamed into place only when everything
succeeded; publishing swaps the ``latest`` link with one ``rename``, so a reader sees the previous
run or the new one, never a mix, and a failed or interrupted run leaves the published one
untouched. Earlier runs stay under ``runs/`` (``--keep_runs`` prunes the oldest).

Concurrent runs: publishing (rename, ``latest`` swap, links, migration) and pruning hold an
exclusive lock on ``attacks/.lock``, so two runs never interleave those steps. A staging folder
records its owner process; a later run removes the staging folders of runs whose process is gone
(killed with kill -9), never one of a live run. Every path is checked to lie inside the
experiment (``mia_lightning.contract.confine``) before anything is written, renamed or deleted.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from mia_lightning.contract.confine import confined, confined_all, plain_name
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import check_writable_folder, load_json, load_npy, save_json_atomic
from mia_lightning.contract.owners import OWNER_FILE, exclusive_lock, owner_gone, write_owner

RUN_FILE = "run.json"
UTILITY_FILE = "utility.json"
FEW_SHADOW_FILE = "few_shadow/few_shadow.json"
SCORES_FILE = "scores.npy"
LATEST = "latest"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"


def new_run_id() -> str:
    """Unique run id that sorts by start time: UTC time to the microsecond plus 4 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f") + "-" + uuid.uuid4().hex[:4]


def runs_dir(experiment: ExperimentDir) -> Path:
    return experiment.attacks_dir / "runs"


def publishing_lock(experiment: ExperimentDir) -> ContextManager[None]:
    """Exclusive lock on ``attacks/.lock``: held while runs are published or pruned."""
    return exclusive_lock(confined(experiment.root, experiment.attacks_dir / LOCK_FILE))


def remove_dead_stagings(experiment: ExperimentDir) -> list[str]:
    """Delete the staging folders of runs whose process is gone (call under the publishing lock); returns their names."""
    removed = []
    for folder in sorted(runs_dir(experiment).glob(STAGING_PREFIX + "*")):
        if folder.is_dir() and not folder.is_symlink() and owner_gone(folder):
            shutil.rmtree(confined(experiment.root, folder))
            removed.append(folder.name)
    return removed


class StagedRun:
    """A run being written: files go to a hidden staging folder until ``publish``."""

    def __init__(self, experiment: ExperimentDir, run_id: str | None = None) -> None:
        self.experiment = experiment
        self.run_id = run_id or new_run_id()
        parent = runs_dir(experiment)
        confined_all(experiment.root, [experiment.attacks_dir, parent, *_entries(experiment)])
        check_writable_folder(parent, "the attack results")
        parent.mkdir(parents=True, exist_ok=True)
        self.folder = parent / f"{STAGING_PREFIX}{self.run_id}"
        with publishing_lock(experiment):
            remove_dead_stagings(experiment)
            self.folder.mkdir()
            try:
                write_owner(self.folder)
            except BaseException:  # e.g. a full disk: leave no ownerless folder behind
                shutil.rmtree(self.folder, ignore_errors=True)
                raise

    def path(self, *parts: str) -> Path:
        """A path inside the staged run (parent folders are created)."""
        target = confined(self.experiment.root, self.folder.joinpath(*parts))
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def publish(self, meta: dict) -> Path:
        """Write run.json, move the run into place and make it the latest; returns the run folder."""
        save_json_atomic(self.path(RUN_FILE), {**meta, "id": self.run_id})
        root = self.experiment.root
        final = confined(root, runs_dir(self.experiment) / self.run_id)
        with publishing_lock(self.experiment):  # the owner record goes under the lock: no other run judges this folder meanwhile
            confined_all(root, [self.experiment.attacks_dir, runs_dir(self.experiment), *_entries(self.experiment)])
            (self.folder / OWNER_FILE).unlink(missing_ok=True)
            os.rename(self.folder, final)
            _migrate_unversioned(self.experiment)
            link = confined(root, self.experiment.attacks_dir / LATEST)
            staged_link = confined(root, self.experiment.attacks_dir / f".{LATEST}-{self.run_id}")
            os.symlink(Path("runs") / self.run_id, staged_link)
            os.replace(staged_link, link)
            _refresh_entry_links(self.experiment, final)
        return final


def _entries(experiment: ExperimentDir) -> list[Path]:
    """Everything directly under attacks/ and attacks/runs/ (checked before a run writes, renames or deletes any of it)."""
    folders = [experiment.attacks_dir, runs_dir(experiment)]
    return [entry for folder in folders if folder.is_dir() and not folder.is_symlink() for entry in folder.iterdir()]


def _migrate_unversioned(experiment: ExperimentDir) -> None:
    """Move results written by layout version 1 (real folders directly under attacks/) into runs/legacy-v1/."""
    attacks = experiment.attacks_dir
    legacy = [p for p in attacks.iterdir() if not p.is_symlink() and p.name not in ("runs",) and not p.name.startswith(".")]
    if not legacy:
        return
    target = confined(experiment.root, runs_dir(experiment) / "legacy-v1")
    target.mkdir(parents=True, exist_ok=True)
    for entry in legacy:
        os.rename(confined(experiment.root, entry), target / entry.name)


def _refresh_entry_links(experiment: ExperimentDir, run_folder: Path) -> None:
    """attacks/<entry> -> latest/<entry> for every entry of the published run; links into entries it lacks are removed."""
    attacks = experiment.attacks_dir
    wanted = {entry.name for entry in run_folder.iterdir()}
    for entry in attacks.iterdir():
        if entry.is_symlink() and entry.name != LATEST and entry.name not in wanted:
            entry.unlink()
    for name in wanted:
        link = attacks / name
        if not link.is_symlink():
            os.symlink(Path(LATEST) / name, link)


def has_published_run(experiment: ExperimentDir) -> bool:
    """Whether the experiment has a published attack run (``attacks/latest/run.json``)."""
    return (experiment.attacks_dir / LATEST / RUN_FILE).is_file()


def latest_run(experiment: ExperimentDir) -> tuple[Path, dict]:
    """(folder, run.json) of the published run; a one-line error when there is none.

    ``latest`` is a link read from the experiment: it must lead to a run folder under ``attacks/runs``
    inside the experiment, so a crafted link cannot make reports or the API read a run from elsewhere.
    """
    link = experiment.attacks_dir / LATEST
    if not has_published_run(experiment):
        raise MiaError(f"{experiment.attacks_dir}: no published attack run; run `python attack.py --experiment {experiment.root}` first")
    folder, runs = link.resolve(), runs_dir(experiment).resolve()
    if folder.parent != runs or not runs.is_relative_to(experiment.root.resolve()) or folder.name.startswith("."):
        raise MiaError(f"{link}: leads to {folder}, not a run folder under {runs_dir(experiment)} inside the experiment; "
                       f"delete {link} and re-run `python attack.py --experiment {experiment.root} --attack <attack>` (it publishes a new latest)")
    return folder, read_run_file(folder)


def run_by_id(experiment: ExperimentDir, run_id: object, where: str, fix: str) -> tuple[Path, dict] | None:
    """(folder, run.json) of run ``run_id`` under ``attacks/runs/`` (an id read from ``where``, checked to be a plain name); None when that run is gone.

    ``fix``: what an id that is not a plain name or a damaged run.json asks for (whoever recorded the id knows: a study audits the setting again).
    """
    folder = runs_dir(experiment) / plain_name(run_id, where, fix)
    return (folder, read_run_file(folder, fix)) if (folder / RUN_FILE).is_file() else None


def run_results(folder: Path, run: dict, levels: Sequence[float] = (), fix: str | None = None) -> dict[str, dict]:
    """The checked results.json of every output ``run`` (the folder's checked run.json) names, by output name, in the run's order.

    The names come from a file and are joined into paths, so each must be a plain folder name, and
    each results.json must name its own output (a crafted run cannot point a report at other files).
    ``levels``: FPR levels every record must hold a TPR at (the columns of the caller's tables).
    ``fix``: what a damaged results.json asks for (default: the attack.py command of the run; a study's ``setting_fix``).
    """
    where, fix = f"{Path(folder) / RUN_FILE} outputs", fix or rerun_fix(folder, run)
    results = {}
    for name in run["outputs"]:
        path = Path(folder) / plain_name(name, where, fix) / "results.json"
        record = load_json(path, fix)
        if not isinstance(record, dict) or record.get("attack") != name:
            raise MiaError(f"{path}: names output {record.get('attack') if isinstance(record, dict) else record!r}, not {name!r}; {fix}")
        results[name] = check_results(record, path, fix, levels)
    return results


def prune_runs(experiment: ExperimentDir, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest runs (never the latest); returns the removed ids."""
    if keep < 1:
        raise MiaError(f"--keep_runs {keep}: keep at least the latest run")
    with publishing_lock(experiment):
        latest = (experiment.attacks_dir / LATEST).resolve().name
        runs = sorted(p for p in runs_dir(experiment).iterdir() if p.is_dir() and not p.name.startswith("."))
        doomed = [p for p in runs[:-keep] if p.name != latest]
        confined_all(experiment.root, doomed)
        for folder in doomed:
            shutil.rmtree(folder)
    return [p.name for p in doomed]


# ------------------------------------------------------------------ checks of the published files

SETTING_FILE = "setting.json"
"""A study setting's marker in its experiment folder: the setting's overrides and the id of the attack run the study recorded."""


def setting_fix(experiment: ExperimentDir) -> str:
    """The fix for a damaged or missing file of the attack run a study setting recorded: audit the setting again.

    attack.py would publish a new run that the setting's marker does not name, and the study's analysis reads the recorded one.
    """
    return f"delete {experiment.root / SETTING_FILE} and re-run the study (it audits the setting again)"


def rerun_fix(folder: Path, run: Any) -> str:
    """The fix for a file of run ``folder`` (``<experiment>/attacks/runs/<id>``) that does not hold what attack.py writes: the attack.py command that runs its attacks again.

    ``run``: the run's run.json as read, damaged or not (``<attack>`` stands in for attacks it does not name).
    ``--few_shadow`` joins the command when the run holds a few-shadow curve: a re-run without it would drop the curve.
    """
    folder = Path(folder).resolve()
    attacks = run.get("attacks") if isinstance(run, dict) else None
    experiment = folder.parent.parent.parent if folder.parent.name == "runs" else "<experiment>"
    named = isinstance(attacks, list) and attacks and all(isinstance(name, str) and name.isidentifier() for name in attacks)
    few_shadow = " --few_shadow" if (folder / FEW_SHADOW_FILE).is_file() else ""
    options = _rerun_options(run.get("options") if isinstance(run, dict) else None)
    return f"re-run `python attack.py --experiment {experiment} --attack {' '.join(attacks) if named else '<attack>'}{options}{few_shadow}`"


def _rerun_options(options: Any) -> str:
    """run.json's ``options`` (what ``audit.rerun_options`` recorded) as command-line words, each shell-quoted.

    Only the options of ``RERUN_OPTIONS`` with values that pass their checks are written: the block is
    read from a file, and a copied command must not carry anything else (an older run has no block).
    """
    if not isinstance(options, dict):
        return ""
    words = []
    for name, value in options.items():
        if name in RERUN_OPTIONS and RERUN_OPTIONS[name][0](value):
            values = value if name == "targets" else [json.dumps(value) if name == "params" else value]
            words += [f"--{name}", *(shlex.quote(str(v)) for v in values)]
    return "".join(f" {word}" for word in words)


Check = tuple[Callable[[Any], bool], str]
"""A test of one JSON value and what it expects, for the message."""


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (a bool, which Python counts as an int, is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_level(key: Any) -> bool:
    """Whether ``key`` is an FPR level as results.json writes it (``str`` of a float in (0, 1])."""
    try:
        return isinstance(key, str) and str(float(key)) == key and 0.0 < float(key) <= 1.0
    except ValueError:
        return False


NUMBER: Check = (_is_number, "a number")
COUNT: Check = (lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0, "a non-negative integer")
TEXT: Check = (lambda value: isinstance(value, str), "a string")
FLAG: Check = (lambda value: isinstance(value, bool), "true or false")
OBJECT: Check = (lambda value: isinstance(value, dict), "an object")
INTERVAL: Check = (lambda value: isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)), "a [low, high] pair of numbers")
MODEL_IDS: Check = (lambda value: isinstance(value, list) and bool(value) and all(COUNT[0](v) for v in value), "a non-empty list of model ids")
PARAMS: Check = (lambda value: isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() and isinstance(v, dict) for k, v in value.items()),
                 "an object of parameters by attack")
NAME: Check = (lambda value: isinstance(value, str) and value.isidentifier(), "a name")
RERUN_OPTIONS: dict[str, Check] = {"targets": MODEL_IDS, "n_targets": COUNT, "params": PARAMS, "bootstrap": COUNT,
                                   "user_reduce": NAME, "fpr_budget": NUMBER, "threshold_rule": NAME}
"""The attack.py options a run records in run.json's ``options`` (``audit.rerun_options``) and ``rerun_fix`` repeats."""
NUMBERS: Check = (lambda value: isinstance(value, list) and all(v is None or _is_number(v) for v in value), "a list of numbers or nulls")


def _by_level(check: Check, levels: Sequence[str]) -> Check:
    """An object holding a value that passes ``check`` at each FPR level of ``levels``."""
    return ((lambda value: isinstance(value, dict) and all(_is_level(k) and k in value and check[0](value[k]) for k in levels)),
            f"an object of {check[1]} at FPR levels {', '.join(levels)}")


def _expect(block: dict, name: str, check: Check, where: str, fix: str, optional: bool = False) -> Any:
    """``block[name]`` once it passes ``check`` (absent or null passes when ``optional``); else a one-line error: ``where`` + the field, its value, ``fix``."""
    value = block.get(name)
    if optional and value is None:
        return None
    if not check[0](value):
        got = "missing" if name not in block else json.dumps(value)[:60]
        raise MiaError(f"{where}{name} is {got}, expected {check[1]}{' or null' if optional else ''}; {fix}")
    return value


def _check_metrics(block: dict, where: str, levels: Sequence[str], fix: str) -> None:
    """The metric fields every view formats, of a record or of its user-level block."""
    _expect(block, "auc", NUMBER, where, fix)
    _expect(block, "auc_ci_bootstrap", INTERVAL, where, fix, optional=True)
    tprs = _expect(block, "tpr_at_fpr", OBJECT, where, fix)
    _expect(block, "tpr_at_fpr", _by_level(NUMBER, list(dict.fromkeys([*levels, *tprs])) or ["(none)"]), where, fix)
    _expect(block, "tpr_at_fpr_ci_bootstrap", _by_level(INTERVAL, list(tprs)), where, fix, optional=True)
    _expect(block, "min_resolvable_fpr", NUMBER, where, fix, optional=True)
    _expect(block, "bootstrap_unit", TEXT, where, fix, optional=True)
    decision = _expect(block, "precision_recall", OBJECT, where, fix, optional=True)
    if decision and "skipped" not in decision:
        inner = f"{where}precision_recall."
        for name in ("precision", "recall", "fpr"):
            _expect(decision, name, NUMBER, inner, fix, optional=True)
        _expect(decision, "fpr_budget", NUMBER, inner, fix)
        _expect(decision, "population_fpr", NUMBER, inner, fix)
        _expect(decision, "rule", TEXT, inner, fix)


def check_results(record: Any, path: Path, fix: str, levels: Sequence[float] = ()) -> dict:
    """``record`` (a results.json) once every field a view or ``Record`` reads has its type, with a TPR at each of ``levels``; a one-line error naming the field and ``fix`` otherwise."""
    if not isinstance(record, dict):
        raise MiaError(f"{path}: holds {json.dumps(record)[:60]}, expected an object; {fix}")
    where = f"{path}: "
    _check_metrics(record, where, [str(level) for level in levels], fix)
    _expect(record, "family", TEXT, where, fix, optional=True)
    _expect(record, "balanced_accuracy", NUMBER, where, fix)
    _expect(record, "tpr_at_fpr_ci", _by_level(INTERVAL, list(record["tpr_at_fpr"])), where, fix)
    for name in ("n_members", "n_nonmembers"):
        _expect(record, name, COUNT, where, fix)
    _expect(record, "targets", MODEL_IDS, where, fix)
    _expect(_expect(record, "run", OBJECT, where, fix, optional=True) or {}, "id", TEXT, f"{where}run.", fix, optional=True)
    users = _expect(record, "user_level", OBJECT, where, fix, optional=True)
    if users and "auc" in users:
        _check_metrics(users, f"{where}user_level.", [], fix)
        _expect(users, "n_users", COUNT, f"{where}user_level.", fix)
        _expect(users, "reduce", TEXT, f"{where}user_level.", fix)
    eps = _expect(record, "empirical_epsilon", OBJECT, where, fix, optional=True)
    if eps:
        inner = f"{where}empirical_epsilon."
        for name in ("max_possible", "theoretical_epsilon"):
            _expect(eps, name, NUMBER, inner, fix, optional=True)
        for name in ("method", "statement", "reason"):
            _expect(eps, name, TEXT, inner, fix, optional=True)
        _expect(eps, "n_trials", COUNT, inner, fix, optional=True)
        if _expect(eps, "epsilon_lower_bound", NUMBER, inner, fix, optional=True) is not None:
            _expect(eps, "delta", NUMBER, inner, fix)
            _expect(eps, "confidence", NUMBER, inner, fix)
    control = _expect(record, "fpr_control", OBJECT, where, fix, optional=True)
    if control:
        inner = f"{where}fpr_control."
        _expect(control, "alpha", NUMBER, inner, fix)
        _expect(control, "alpha_interval", INTERVAL, inner, fix)
        for name in ("fpr", "tpr"):
            _expect(control, name, NUMBER, inner, fix, optional=True)
        if _expect(control, "fpr_ci_bootstrap", INTERVAL, inner, fix, optional=True):
            _expect(control, "fpr_consistent", FLAG, inner, fix)
    return record


def check_run(run: Any, path: Path, fix: str) -> dict:
    """``run`` (a run.json) once its id, outputs and skipped attacks have their types; a one-line error naming the field and ``fix`` otherwise."""
    if not isinstance(run, dict):
        raise MiaError(f"{path}: holds {json.dumps(run)[:60]}, expected an object; {fix}")
    where = f"{path}: "
    _expect(run, "id", TEXT, where, fix)
    _expect(run, "outputs", (lambda value: isinstance(value, list), "a list of output names"), where, fix)
    entry: Check = (lambda value: isinstance(value, dict) and TEXT[0](value.get("attack")) and TEXT[0](value.get("reason")),
                    'objects {"attack": ..., "reason": ...}')
    _expect(run, "skipped", (lambda value: isinstance(value, list) and all(entry[0](v) for v in value), f"a list of {entry[1]}"), where, fix, optional=True)
    return run


def read_run_file(folder: Path, fix: str | None = None) -> dict:
    """The checked run.json of run folder ``folder``.

    ``fix``: what a damaged run.json asks for (default: the attack.py command of the run, with the
    attacks it records where it still names them; a study's fix for the run its setting recorded).
    """
    path = Path(folder) / RUN_FILE
    run = load_json(path, fix or rerun_fix(folder, None))
    return check_run(run, path, fix or rerun_fix(folder, run))


def run_utility(folder: Path, fix: str) -> dict | None:
    """The checked utility.json of run folder ``folder`` (the target models' accuracies), or None when the run has none.

    ``fix``: what a damaged utility.json asks for (``rerun_fix`` of the run; a study's ``setting_fix``).
    """
    path = Path(folder) / UTILITY_FILE
    if not path.is_file():
        return None
    utility = load_json(path, fix)
    if not isinstance(utility, dict):
        raise MiaError(f"{path}: holds {json.dumps(utility)[:60]}, expected an object; {fix}")
    where = f"{path}: "
    _expect(utility, "targets", MODEL_IDS, where, fix)
    for name in ("test_accuracy", "train_accuracy", "train_test_gap", "test_accuracy_std", "train_accuracy_std"):
        _expect(utility, name, NUMBER, where, fix, optional=True)
    model: Check = (lambda value: isinstance(value, dict) and all(value.get(k) is None or _is_number(value[k]) for k in ("test_accuracy", "train_accuracy")),
                    "an object with test_accuracy and train_accuracy numbers")
    _expect(utility, "per_model", (lambda value: isinstance(value, list) and all(model[0](v) for v in value), f"a list of {model[1]}"), where, fix)
    per_class = _expect(utility, "per_class", OBJECT, where, fix)
    for name in ("precision", "recall", "f1"):
        _expect(per_class, name, NUMBERS, f"{where}per_class.", fix)
    return utility


def run_few_shadow(folder: Path, fix: str) -> list[dict] | None:
    """The checked rows of run ``folder``'s few-shadow curve (``--few_shadow``), or None when the run has none.

    ``fix``: what a damaged few_shadow.json asks for (``rerun_fix`` of the run).
    """
    path = Path(folder) / FEW_SHADOW_FILE
    if not path.is_file():
        return None
    curve = load_json(path, fix)
    rows = curve.get("rows") if isinstance(curve, dict) else None
    if not isinstance(rows, list):
        raise MiaError(f"{path}: holds {json.dumps(curve)[:60]}, expected an object with a list of rows; {fix}")
    for index, row in enumerate(rows):
        where = f"{path}: rows[{index}]."
        if not isinstance(row, dict):
            raise MiaError(f"{path}: rows[{index}] is {json.dumps(row)[:60]}, expected an object; {fix}")
        _expect(row, "attack", TEXT, where, fix)
        _expect(row, "n_shadows", COUNT, where, fix)
        for name in ("auc", "tpr@0.001", "tpr@0.01"):
            _expect(row, name, NUMBER, where, fix, optional=True)
    return rows


def output_scores(folder: Path, record: dict, keep: np.ndarray, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 scores [T, n], members [T, n]) of one checked output of run ``folder``: its scores.npy, refused unless it is one float row per target over keep.npy's samples.

    ``fix``: what the one-line error tells the user to do (``rerun_fix`` of the run; a study's analysis re-runs the setting instead).
    """
    path = Path(folder) / record["attack"] / SCORES_FILE
    scores = load_npy(path, "attack scores", fix)
    targets = record["targets"]
    if max(targets) >= keep.shape[0]:
        raise MiaError(f"{path.parent / 'results.json'}: targets name model {max(targets)}, but keep.npy has {keep.shape[0]} models; {fix}")
    expected = (len(targets), keep.shape[1])
    if scores.shape != expected or not np.issubdtype(scores.dtype, np.floating):
        raise MiaError(f"{path}: {scores.dtype} array of shape {scores.shape}, expected floats of shape {expected} "
                       f"(the run's {len(targets)} targets x keep.npy's samples); {fix}")
    return np.asarray(scores, dtype=np.float64), keep[np.asarray(targets, dtype=np.int64)]
