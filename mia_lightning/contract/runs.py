"""Attack runs as units: one ``attack.py`` invocation writes one run folder, published all at once.

Layout under ``<experiment>/attacks/``::

    runs/<run id>/run.json            what the run was: id, time, attacks, targets, parameters, version
    runs/<run id>/<output>/results.json, scores.npy, roc.png
    runs/<run id>/roc.png, few_shadow/, utility.json ...
    latest -> runs/<run id>           the published run (a symlink, replaced atomically)
    <entry> -> latest/<entry>         convenience links: attacks/lira_online/results.json etc.

A run is written into ``runs/.staging-<id>/`` and renamed into place only when everything
succeeded; publishing swaps the ``latest`` link with one ``rename``, so a reader sees the previous
run or the new one, never a mix, and a failed or interrupted run leaves the published one
untouched. Earlier runs stay under ``runs/`` (``--keep_runs`` prunes the oldest).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from pathlib import Path

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json, save_json_atomic

RUN_FILE = "run.json"
LATEST = "latest"


def new_run_id() -> str:
    """Unique run id that sorts by start time: UTC time to the microsecond plus 4 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f") + "-" + uuid.uuid4().hex[:4]


def runs_dir(experiment: ExperimentDir) -> Path:
    return experiment.attacks_dir / "runs"


class StagedRun:
    """A run being written: files go to a hidden staging folder until ``publish``."""

    def __init__(self, experiment: ExperimentDir, run_id: str | None = None) -> None:
        self.experiment = experiment
        self.run_id = run_id or new_run_id()
        parent = runs_dir(experiment)
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise MiaError(f"{existing}: not writable; the attack results cannot be saved (fix its permissions or copy the experiment)")
        parent.mkdir(parents=True, exist_ok=True)
        self.folder = parent / f".staging-{self.run_id}"
        self.folder.mkdir()

    def path(self, *parts: str) -> Path:
        """A path inside the staged run (parent folders are created)."""
        target = self.folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def publish(self, meta: dict) -> Path:
        """Write run.json, move the run into place and make it the latest; returns the run folder."""
        save_json_atomic(self.folder / RUN_FILE, {**meta, "id": self.run_id})
        final = runs_dir(self.experiment) / self.run_id
        os.rename(self.folder, final)
        _migrate_unversioned(self.experiment)
        link = self.experiment.attacks_dir / LATEST
        staged_link = self.experiment.attacks_dir / f".{LATEST}-{self.run_id}"
        os.symlink(Path("runs") / self.run_id, staged_link)
        os.replace(staged_link, link)
        _refresh_entry_links(self.experiment, final)
        return final


def _migrate_unversioned(experiment: ExperimentDir) -> None:
    """Move results written by layout version 1 (real folders directly under attacks/) into runs/legacy-v1/."""
    attacks = experiment.attacks_dir
    legacy = [p for p in attacks.iterdir() if not p.is_symlink() and p.name not in ("runs",) and not p.name.startswith(".")]
    if not legacy:
        return
    target = runs_dir(experiment) / "legacy-v1"
    target.mkdir(parents=True, exist_ok=True)
    for entry in legacy:
        os.rename(entry, target / entry.name)


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


def latest_run(experiment: ExperimentDir) -> tuple[Path, dict]:
    """(folder, run.json) of the published run; a one-line error when there is none."""
    link = experiment.attacks_dir / LATEST
    if not (link / RUN_FILE).is_file():
        raise MiaError(f"{experiment.attacks_dir}: no published attack run; run `python attack.py --experiment {experiment.root}` first")
    folder = link.resolve()
    return folder, load_json(folder / RUN_FILE)


def prune_runs(experiment: ExperimentDir, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest runs (never the latest); returns the removed ids."""
    if keep < 1:
        raise MiaError(f"--keep_runs {keep}: keep at least the latest run")
    latest = (experiment.attacks_dir / LATEST).resolve().name
    runs = sorted(p for p in runs_dir(experiment).iterdir() if p.is_dir() and not p.name.startswith("."))
    doomed = [p for p in runs[:-keep] if p.name != latest]
    for folder in doomed:
        shutil.rmtree(folder)
    return [p.name for p in doomed]
