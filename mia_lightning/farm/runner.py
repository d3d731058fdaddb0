"""Stage 1-3 driver: plan the experiment, train this shard's missing models, write them atomically.

Resume is by file: a model whose ``done.json`` exists is skipped; ``model.ckpt`` and ``logits.npy``
are written before ``done.json`` (all atomically), so a kill at any moment leaves either a finished
model or one that is retrained from scratch with the same seed, giving the same result.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
from rich.console import Console

from mia_lightning.data.plan import make_lira_plan
from mia_lightning.errors import MiaError
from mia_lightning.experiment import ExperimentDir
from mia_lightning.farm.checkpoints import save_model_checkpoint
from mia_lightning.farm.config import Recipe
from mia_lightning.farm.engine import ModelJob, SequentialEngine, TrainedModel, model_seed
from mia_lightning.farm.locks import Heartbeat, release, try_claim
from mia_lightning.farm.shards import resolve_shard
from mia_lightning.io import load_json, load_npy, save_json_atomic, save_npy_atomic, write_bytes_atomic

DONE_FILE = "done.json"


def is_done(experiment: ExperimentDir, index: int) -> bool:
    return (experiment.model_dir(index) / DONE_FILE).is_file()


def prepare_experiment(recipe: Recipe) -> np.ndarray:
    """Write (or check) plan.json, keep.npy, labels.npy, population.npy and config.yaml; returns keep."""
    experiment = recipe.experiment
    pool = recipe.setup.data.build()
    recipe.setup.build_model(pool, seed=0)  # a bad model config fails here, before anything is written
    labels = np.asarray(pool.pool_labels(), dtype=np.int64)
    spec = recipe.plan_spec(getattr(pool, "dataset_id", recipe.setup.data.class_path), len(labels))
    plan_json = {**spec.to_json(), "recipe": recipe.identity()}
    keep, population = make_lira_plan(spec)
    if experiment.plan_path.is_file():
        stored = load_json(experiment.plan_path)
        if stored != plan_json:
            raise MiaError(
                f"{experiment.plan_path}: this experiment was planned with a different recipe (plan, data or model); "
                "use another --experiment.name or delete the directory"
            )
        stored_keep = load_npy(experiment.keep_path, "membership matrix", "delete the experiment directory and re-run the farm")
        if not np.array_equal(stored_keep, keep):
            raise MiaError(f"{experiment.keep_path}: differs from the plan in plan.json (edited or corrupt); delete the experiment and re-run")
        return keep
    save_npy_atomic(experiment.keep_path, keep)
    save_npy_atomic(experiment.labels_path, labels)
    if spec.n_population:
        save_npy_atomic(experiment.population_path, population)
    write_bytes_atomic(experiment.config_path, recipe.dumped.encode())
    save_json_atomic(experiment.plan_path, plan_json)
    return keep


def write_model(experiment: ExperimentDir, trained: TrainedModel, job: ModelJob, engine: str) -> None:
    """Checkpoint, logits, then done.json: the model is complete only once done.json exists."""
    folder = experiment.model_dir(trained.index)
    save_model_checkpoint(trained.module, folder / "model.ckpt", trained.index, experiment.root.name)
    save_npy_atomic(folder / "logits.npy", np.asarray(trained.logits, dtype=np.float32))
    save_json_atomic(
        folder / DONE_FILE,
        {"index": trained.index, "seed": job.seed, "n_train": int(job.train_indices.size), "engine": engine,
         "metrics": trained.metrics, "host": socket.gethostname(), "pid": os.getpid(), "finished_at": time.time()},
    )


def build_engine(recipe: Recipe, progress_bar: bool):
    """The engine named by ``farm.engine``, with a rich progress bar per Lightning run when wanted."""
    from lightning.pytorch.callbacks import RichProgressBar

    progress = (lambda: [RichProgressBar(leave=False)]) if progress_bar else None
    if recipe.farm.engine == "sequential":
        return SequentialEngine(recipe.setup, progress=progress)
    from mia_lightning.farm.vectorised import VectorisedEngine

    return VectorisedEngine(recipe.setup, group_size=recipe.farm.group_size, progress=progress)


class _Claims:
    """The models this process holds: claimed from a queue, kept alive by the heartbeat, released once written."""

    def __init__(self, experiment: ExperimentDir, stale_after_s: float, heartbeat: Heartbeat) -> None:
        self.experiment, self.stale_after_s, self.heartbeat = experiment, stale_after_s, heartbeat
        self.held_elsewhere: list[int] = []

    def take(self, queue: list[int], count: int) -> list[int]:
        """Claim up to ``count`` models from the front of ``queue`` that are neither done nor held by a live process."""
        claimed: list[int] = []
        while queue and len(claimed) < count:
            index = queue.pop(0)
            folder = self.experiment.model_dir(index)
            if is_done(self.experiment, index):
                continue
            if not try_claim(folder, self.stale_after_s):
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


def run_farm(recipe: Recipe, console: Console | None = None, progress_bar: bool = True) -> list[int]:
    """Train every model of this shard that is not done and not claimed by a live process; returns the ids trained."""
    console = console or Console()
    experiment = recipe.experiment
    keep = prepare_experiment(recipe)
    shard = resolve_shard(recipe.farm.shard)
    mine = shard.select(list(range(keep.shape[0])))
    pending = [i for i in mine if not is_done(experiment, i)]
    console.print(
        f"[bold]farm[/] {experiment.root}: {keep.shape[0]} models, shard {shard} has {len(mine)}, "
        f"{len(mine) - len(pending)} already done, engine {recipe.farm.engine}"
    )
    show_bar = progress_bar and recipe.setup.trainer.get("enable_progress_bar", True) and not os.environ.get("MIA_FARM_WORKER")
    engine = build_engine(recipe, show_bar)
    group = recipe.farm.group_size if recipe.farm.engine == "vectorised" else 1
    trained: list[int] = []
    started = time.perf_counter()
    queue = list(pending)
    with Heartbeat() as heartbeat:
        claims = _Claims(experiment, recipe.farm.stale_after_s, heartbeat)
        while claimed := claims.take(queue, group):
            jobs = {i: ModelJob(i, np.flatnonzero(keep[i]), model_seed(recipe.plan.seed, i)) for i in claimed}
            try:
                for result in engine.run(list(jobs.values())):
                    write_model(experiment, result, jobs[result.index], recipe.farm.engine)
                    claims.release(result.index)
                    trained.append(result.index)
                    rate = len(trained) / max(time.perf_counter() - started, 1e-9) * 60
                    metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.endswith("acc"))
                    console.print(f"farm: model {result.index:4d} done  {len(trained)}/{len(pending)}  {metrics}  ({rate:.1f} models/min)")
            finally:  # on failure or interrupt, let other processes take the unfinished models
                for index in claimed:
                    claims.release(index)
    held = [i for i in claims.held_elsewhere if not is_done(experiment, i)]
    if held:
        console.print(f"[yellow]farm[/]: {len(held)} models are being trained by other processes: {held[:10]}{' ...' if len(held) > 10 else ''}")
    return trained
