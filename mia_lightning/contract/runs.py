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
import os
import shutil
import uuid
from pathlib import Path

from mia_lightning.contract.confine import confined, confined_all, plain_name
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json, save_json_atomic
from mia_lightning.contract.owners import OWNER_FILE, exclusive_lock, owner_gone, write_owner

RUN_FILE = "run.json"
LATEST = "latest"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"


def new_run_id() -> str:
    """Unique run id that sorts by start time: UTC time to the microsecond plus 4 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f") + "-" + uuid.uuid4().hex[:4]


def runs_dir(experiment: ExperimentDir) -> Path:
    return experiment.attacks_dir / "runs"


def publishing_lock(experiment: ExperimentDir):
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


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be made or written: a file where it (or a parent) should be, or no write permission."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise MiaError(f"{existing}: a file where a folder should be; {what} cannot be saved (move or delete the file)")
    if not os.access(existing, os.W_OK):
        raise MiaError(f"{existing}: not writable; {what} cannot be saved (fix its permissions or copy the experiment)")


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
    """(folder, run.json) of the published run; a one-line error when there is none."""
    link = experiment.attacks_dir / LATEST
    if not has_published_run(experiment):
        raise MiaError(f"{experiment.attacks_dir}: no published attack run; run `python attack.py --experiment {experiment.root}` first")
    folder = link.resolve()
    return folder, load_json(folder / RUN_FILE)


def run_by_id(experiment: ExperimentDir, run_id: object, where: str) -> tuple[Path, dict] | None:
    """(folder, run.json) of run ``run_id`` under ``attacks/runs/`` (an id read from ``where``, checked to be a plain name); None when that run is gone."""
    folder = runs_dir(experiment) / plain_name(run_id, where)
    return (folder, load_json(folder / RUN_FILE)) if (folder / RUN_FILE).is_file() else None


def run_results(folder: Path, run: dict) -> dict[str, dict]:
    """The results.json of every output ``run`` (the folder's run.json) names, by output name, in the run's order.

    The names come from a file and are joined into paths, so each must be a plain folder name, and
    each results.json must name its own output (a crafted run cannot point a report at other files).
    """
    where = f"{Path(folder) / RUN_FILE} outputs"
    names = run.get("outputs", []) if isinstance(run, dict) else None
    if not isinstance(names, list):
        raise MiaError(f"{where}: expected a list of output names, got {names!r}; re-run attack.py on the experiment")
    results = {}
    for name in names:
        path = Path(folder) / plain_name(name, where) / "results.json"
        record = load_json(path)
        if not isinstance(record, dict) or record.get("attack") != name:
            raise MiaError(f"{path}: names output {record.get('attack') if isinstance(record, dict) else record!r}, not {name!r}; re-run attack.py on the experiment")
        results[name] = record
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
