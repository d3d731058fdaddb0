"""Stage 1-3 driver: plan the experiment, train this shard's missing models, write them atomically.

Resume is by file: a model whose ``done.json`` exists is skipped; ``model.ckpt`` and ``logits.npy``
are written before ``done.json`` (all atomically), so a kill at any moment leaves either a finished
model or one that is retrained from scratch with the same seed, giving the same result.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
import numpy as np
from rich.console import Console

from mia_lightning.data.plan import Plan, make_plan
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import FORMAT_VERSION, ExperimentDir
from mia_lightning.contract.components import with_current_class_paths
from mia_lightning.farm.checkpoints import CHECKPOINT_DIGEST, CHECKPOINT_FILE, save_model_checkpoint
from mia_lightning.farm.config import Recipe, emulated_bfloat16
from mia_lightning.farm.engine import ENGINES, ModelJob, TrainedModel, model_seed, resolve_engine
from mia_lightning.contract.model_outputs import checked_outputs, save_model_outputs
from mia_lightning.farm.locks import Heartbeat, release, try_claim
from mia_lightning.farm.shards import resolve_shard
from mia_lightning.farm.status import is_done, pending_models
from mia_lightning.runtime import torch_threads
from mia_lightning.contract.confine import confined_all
from mia_lightning.contract.data_sources import copy_local_data
from mia_lightning.contract.identity import DONE_FILE, RECIPE_KEY, check_model_identities, differing_keys, with_added_defaults
from mia_lightning.contract.io import check_writable_folder, load_json, load_npy, save_json_atomic, save_npy_atomic, write_bytes_atomic

log = logging.getLogger("mia_lightning")


@dataclass(frozen=True)
class PlannedFarm:
    """What the runner needs from the experiment's plan: the keep matrix and which model derives from which."""

    keep: np.ndarray
    parents: dict[int, int]
    identity: dict


def pool_fingerprint(pool: L.LightningDataModule, labels: np.ndarray) -> str:
    """The DataModule's content hash of its pool (features/texts and labels), or the labels' hash with a warning."""
    if hasattr(pool, "fingerprint"):
        return str(pool.fingerprint())
    log.warning("%s has no fingerprint(): an edited data file would go unnoticed; only the labels are hashed", type(pool).__name__)
    return "labels-only:" + hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()


def validate_training(recipe: Recipe, pool: L.LightningDataModule) -> L.LightningModule:
    """Refuse a recipe that cannot train before anything is written: bad model arguments, optimiser values, trainer settings; returns the model built."""
    trainer = recipe.setup.trainer
    module = recipe.setup.build_model(pool, seed=0)
    try:
        module.configure_optimizers()
    except ValueError as err:
        raise MiaError(f"{recipe.setup.model.class_path}: {err}; fix the optimiser settings in model.init_args") from None
    except RuntimeError:
        pass  # an optimiser that needs the Trainer is checked when training starts
    try:
        recipe.setup.build_trainer()
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        raise MiaError(f"trainer settings: {' '.join(str(err).split())}") from None
    for callback in recipe.setup.build_callbacks():
        check = getattr(callback, "check_recipe", None)  # e.g. DP-SGD: an unreachable epsilon is refused here
        if check is not None:
            check(pool, module, trainer.get("max_epochs"))
    return module


@dataclass(frozen=True)
class _Planning:
    """The plan a recipe makes, with what its files record: the pool's labels and users, and the data-decided model arguments."""

    plan: Plan
    plan_json: dict
    labels: np.ndarray
    groups: np.ndarray | None
    model_kwargs: dict[str, Any]

    @property
    def farm(self) -> PlannedFarm:
        return PlannedFarm(self.plan.keep, self.plan.parents, self.plan_json["recipe"])


def _plan(recipe: Recipe) -> _Planning:
    """Validate the recipe (training, plan) and build its plan and plan.json payload, writing nothing."""
    experiment = recipe.experiment
    if experiment.is_study:
        raise MiaError(f"{experiment.root}: a study's folder (study.json), not an experiment; choose another --experiment.name or --experiment.root")
    folders = [experiment.cache_dir, experiment.models_dir, *(experiment.model_dir(i) for i in range(recipe.plan.n_models))]
    confined_all(experiment.root, folders)  # no symlink leads a model, a claim or the cache out of the experiment
    pool = recipe.setup.build_datamodule()
    model_kwargs = dict(pool.model_kwargs()) if hasattr(pool, "model_kwargs") else {}
    module = validate_training(recipe, pool)
    labels = np.asarray(pool.pool_labels(), dtype=np.int64)
    groups = pool.pool_groups() if hasattr(pool, "pool_groups") else None
    spec = recipe.plan_spec(str(getattr(pool, "dataset_id", recipe.setup.data.class_path)), len(labels))
    plan = make_plan(spec, labels, groups)
    plan_json = {
        **spec.to_json(),
        "info": plan.info,
        "parents": {str(child): parent for child, parent in sorted(plan.parents.items())},
        "recipe": recipe.identity(model_kwargs, pool_fingerprint(pool, labels)),
    }
    if hasattr(module, "signal_layout"):  # named signal columns (a causal LM's): the attacks read them by name
        plan_json["signals"] = module.signal_layout
    return _Planning(plan, plan_json, labels, groups, model_kwargs)


def _check_stored_plan(experiment: ExperimentDir, planning: _Planning) -> None:
    """Refuse an existing experiment planned by another layout version, with another recipe, or whose keep.npy differs from its plan."""
    stored = load_json(experiment.plan_path)
    if not isinstance(stored, dict) or stored.get("version") != FORMAT_VERSION:
        raise MiaError(
            f"{experiment.plan_path}: planned by layout version {stored.get('version') if isinstance(stored, dict) else '?'}; "
            f"this mia-lightning trains layout {FORMAT_VERSION}: use another --experiment.name (attack.py still reads it)"
        )
    changed = differing_keys(with_added_defaults(with_current_class_paths(stored), planning.plan_json, current_from_file=False), planning.plan_json)
    if changed:
        raise MiaError(
            f"{experiment.plan_path}: this experiment was planned with a different recipe ({'; '.join(changed[:6])}"
            f"{'; ...' if len(changed) > 6 else ''}); use another --experiment.name or delete the directory"
        )
    stored_keep = load_npy(experiment.keep_path, "membership matrix", "delete the experiment directory and re-run the farm")
    if not np.array_equal(stored_keep, planning.plan.keep):
        raise MiaError(f"{experiment.keep_path}: differs from the plan in plan.json (edited or corrupt); delete the experiment and re-run")


def check_experiment(recipe: Recipe) -> None:
    """The farm's checks of an already planned experiment (plan, recipe, every finished model's done.json), writing nothing: ``--status`` reports only what the farm would train on."""
    experiment = recipe.experiment
    if not experiment.plan_path.is_file():
        return
    _check_stored_plan(experiment, _plan(recipe))
    check_model_identities(experiment)


def prepare_experiment(recipe: Recipe) -> PlannedFarm:
    """Write (or check) plan.json, keep.npy, labels.npy and the optional contract files; returns the plan.

    Everything is validated first (recipe, trainer, plan); an existing experiment must have been
    planned with exactly the same recipe identity, else the differing keys are named.
    """
    experiment = recipe.experiment
    planning = _plan(recipe)
    if experiment.plan_path.is_file():
        _check_stored_plan(experiment, planning)
        return planning.farm
    plan = planning.plan
    check_writable_folder(experiment.root, "the experiment", fix="choose another --experiment.root or fix its permissions")
    save_npy_atomic(experiment.keep_path, plan.keep)
    save_npy_atomic(experiment.labels_path, planning.labels)
    if plan.population.size:
        save_npy_atomic(experiment.population_path, plan.population)
    if planning.groups is not None:
        save_npy_atomic(experiment.groups_path, np.asarray(planning.groups, dtype=np.int64))
    if plan.audit is not None:
        save_npy_atomic(experiment.audit_path, plan.audit)
    for name, payload in plan.files.items():
        save_json_atomic(experiment.root / name, payload)
    data = recipe.setup.data
    copies = copy_local_data(data.resolve(), data.init_args, experiment.root)  # config.yaml names the experiment's own copy
    write_bytes_atomic(experiment.config_path, recipe.resolved_config(planning.model_kwargs, copies).encode())
    save_json_atomic(experiment.plan_path, planning.plan_json)  # last: its presence means the plan is complete
    return planning.farm


def write_model(experiment: ExperimentDir, trained: TrainedModel, job: ModelJob, engine: str, identity: dict) -> None:
    """Checkpoint, outputs, then done.json (with the recipe ``identity``): the model is complete only once done.json exists.

    The outputs are checked first: a diverged model (NaN/inf logits) is refused, not marked done.
    """
    outputs = checked_outputs(trained.index, trained.logits)
    folder = experiment.model_dir(trained.index)
    digest = save_model_checkpoint(trained.module, folder / CHECKPOINT_FILE, trained.index, experiment.root.name)
    save_model_outputs(folder, outputs)
    save_json_atomic(
        folder / DONE_FILE,
        {"index": trained.index, "seed": job.seed, "n_train": int(job.train_indices.size), "parent": job.parent, "engine": engine,
         "metrics": trained.metrics, "host": socket.gethostname(), "pid": os.getpid(), "finished_at": time.time(), RECIPE_KEY: identity,
         CHECKPOINT_DIGEST: digest},
    )


def build_engine(recipe: Recipe, progress_bar: bool, engine: str | None = None) -> Any:
    """The engine ``engine`` (default: ``farm.engine``; see ``farm.engine.ENGINES``), with a rich progress bar per Lightning run when wanted."""
    from lightning.pytorch.callbacks import RichProgressBar

    progress = (lambda: [RichProgressBar(leave=False)]) if progress_bar else None
    module, _, name = ENGINES[engine or recipe.farm.engine].partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(recipe.setup, group_size=recipe.farm.group_size, progress=progress, experiment=recipe.experiment)


class _Claims:
    """The models this process holds: claimed from a queue, kept alive by the heartbeat, released once written."""

    def __init__(self, experiment: ExperimentDir, stale_after_s: float, heartbeat: Heartbeat, parents: dict[int, int]) -> None:
        self.experiment, self.stale_after_s, self.heartbeat, self.parents = experiment, stale_after_s, heartbeat, parents
        self.held_elsewhere: list[int] = []
        self.waiting: list[int] = []

    def take(self, queue: list[int], count: int) -> list[int]:
        """Claim up to ``count`` models from the front of ``queue`` that are neither done nor held by a live process.

        A model whose parent is not done yet waits (``self.waiting``) and is queued again after the next group.
        """
        claimed: list[int] = []
        queue[:0], self.waiting = self.waiting, []
        while queue and len(claimed) < count:
            index = queue.pop(0)
            folder = self.experiment.model_dir(index)
            parent = self.parents.get(index)
            if is_done(self.experiment, index):
                continue
            if parent is not None and not is_done(self.experiment, parent):
                self.waiting.append(index)
            elif not try_claim(folder, self.stale_after_s):
                self.held_elsewhere.append(index)
            elif is_done(self.experiment, index):  # finished by another process between the two checks
                release(folder)
            else:
                claimed.append(index)
                self.heartbeat.paths.add(folder)
        return claimed

    def release(self, index: int) -> None:
        folder = self.experiment.model_dir(index)
        release(folder)
        self.heartbeat.paths.discard(folder)


def generation(index: int, parents: dict[int, int]) -> int:
    """How many derivations separate a model from one trained from scratch (parents train first)."""
    depth = 0
    while index in parents:
        index, depth = parents[index], depth + 1
    return depth


def run_farm(recipe: Recipe, console: Console | None = None, progress_bar: bool = True) -> list[int]:
    """Train every model of this shard that is not done and not claimed by a live process; returns the ids trained."""
    console = console or Console()
    experiment = recipe.experiment
    planned = prepare_experiment(recipe)
    keep, parents = planned.keep, planned.parents
    shard = resolve_shard(recipe.farm.shard)
    mine = shard.select(list(range(keep.shape[0])))
    check_model_identities(experiment)  # a merged-in model trained with other settings is named before anything trains
    pending = sorted(pending_models(experiment, mine), key=lambda i: (generation(i, parents), i))
    engine_name, why = resolve_engine(recipe.farm.engine, recipe.setup, derived_models=bool(parents))
    from mia_lightning.farm.vectorised import farm_threads

    threads, threads_why = farm_threads(recipe.setup, recipe.farm.threads)
    console.print(
        f"[bold]farm[/] {experiment.root}: {keep.shape[0]} models, shard {shard} has {len(mine)}, "
        f"{len(mine) - len(pending)} already done, engine {engine_name}" + (f" (auto: {why})" if why else "")
        + (f", {threads} torch thread{'s' if threads > 1 else ''} ({threads_why})" if threads else "")
    )
    slow = emulated_bfloat16(recipe.setup.trainer) if pending else None
    if slow:
        console.print(f"[yellow]farm[/]: {slow}")
    with torch_threads(threads):
        return _train_pending(recipe, console, planned, pending, engine_name, progress_bar)


def _train_pending(recipe: Recipe, console: Console, planned: PlannedFarm, pending: list[int], engine_name: str, progress_bar: bool) -> list[int]:
    """Claim and train the pending models, writing each as it finishes; returns the ids trained."""
    experiment, keep, parents = recipe.experiment, planned.keep, planned.parents
    show_bar = progress_bar and recipe.setup.trainer.get("enable_progress_bar", True) and not os.environ.get("MIA_FARM_WORKER")
    engine = build_engine(recipe, show_bar, engine_name)
    group = recipe.farm.group_size if engine.trains_groups else 1
    trained: list[int] = []
    started = time.perf_counter()
    queue = list(pending)
    with Heartbeat() as heartbeat:
        claims = _Claims(experiment, recipe.farm.stale_after_s, heartbeat, parents)
        while claimed := claims.take(queue, group):
            jobs = {i: ModelJob(i, np.flatnonzero(keep[i]), model_seed(recipe.plan.seed, i), parents.get(i)) for i in claimed}
            try:
                rate = None
                for result in engine.run(list(jobs.values())):
                    if rate is None:  # a group's models finish training together: rate them when the first arrives
                        rate = (len(trained) + len(jobs)) / max(time.perf_counter() - started, 1e-9) * 60
                    write_model(experiment, result, jobs[result.index], engine_name, planned.identity)
                    claims.release(result.index)
                    trained.append(result.index)
                    metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.endswith("acc"))
                    console.print(f"farm: model {result.index:4d} done  {len(trained)}/{len(pending)}  {metrics}  ({rate:.1f} models/min)", highlight=False)
            finally:  # on failure or interrupt, let other processes take the unfinished models
                for index in claimed:
                    claims.release(index)
    held = pending_models(experiment, claims.held_elsewhere)
    if held:
        console.print(f"[yellow]farm[/]: {len(held)} models are being trained by other processes: {held[:10]}{' ...' if len(held) > 10 else ''}")
    if claims.waiting:
        console.print(f"[yellow]farm[/]: {len(claims.waiting)} models wait for their parent models (trained by other processes); re-run once those are done")
    return trained
