"""One farm worker process per device: ``--trainer.devices N`` starts N copies of the farm command.

Each worker gets a sub-shard of this process's shard and one device (``CUDA_VISIBLE_DEVICES`` on
GPUs, a share of the CPU threads on CPU); the claim files keep them from colliding. ``devices:
auto`` means every GPU, or on the CPU as many workers as the cores hold at the farm's thread count
(``farm.threads`` or the family's ``cpu_threads``: an LSTM farm on 2 cores runs two one-thread
workers instead of leaving a core idle). The workers
are ordinary ``train.py farm`` processes, so SLURM or torchrun can start the same command instead.
They stop with the farm: an interrupted farm (Ctrl-C, SIGTERM) interrupts the workers still running
and waits for them to release their claims, and a worker whose farm process is gone (``kill -9``)
interrupts itself (``mia_lightning.interrupts``).
Workers import the same ``mia_lightning`` as this process (its folder first on ``PYTHONPATH``, the
working directory never on ``sys.path``), so a file or folder named like the package in the folder
the farm was started from (a received experiment, a download folder) is never run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mia_lightning.errors import MiaError
from mia_lightning.farm.config import Recipe
from mia_lightning.farm.shards import Shard, resolve_shard
from mia_lightning.interrupts import PARENT_ENV, interrupt_signal
from mia_lightning.runtime import usable_cores


AUTO_DEVICES = ("auto", "-1")
"""Lightning's ``devices`` values meaning "as many as there are": every GPU, or on the CPU as many workers as the cores hold."""


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` value puts the farm on CUDA devices."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def device_count(devices: Any, accelerator: str, cpu_threads: int | None = None) -> tuple[int, list[int] | None]:
    """(number of workers, explicit GPU ids or None) from Lightning's ``devices`` value.

    ``auto`` / ``-1`` on the CPU: ``usable cores // cpu_threads`` workers when the farm trains with a
    fixed thread count, else one (torch's default already uses every core).
    """
    if isinstance(devices, (list, tuple)):
        if len(devices) == 1:
            return 1, None
        return len(devices), [int(d) for d in devices]
    text = str(devices)
    if text in AUTO_DEVICES:
        if uses_gpu(accelerator):
            return torch.cuda.device_count(), None
        return (max(1, usable_cores() // cpu_threads) if cpu_threads else 1), None
    try:
        if "," in text:
            ids = [int(d) for d in text.split(",") if d.strip()]
            return len(ids), ids
        return int(text), None
    except ValueError:
        raise MiaError(f"--trainer.devices {text!r}: give a number of devices, GPU ids (e.g. 0,1) or auto") from None


def farm_workers(recipe: Recipe, accelerator: str) -> tuple[int, list[int] | None, str | None]:
    """(worker processes, explicit GPU ids or None, why) for a farm; prepares the experiment first when it will start workers.

    ``devices: auto`` on the CPU starts ``usable cores // the farm's thread count`` workers, at most
    one per model this shard has left to train (a worker's start-up costs seconds).
    """
    from mia_lightning.farm.runner import prepare_experiment
    from mia_lightning.farm.status import pending_models
    from mia_lightning.farm.vectorised import farm_threads

    devices = recipe.setup.trainer.get("devices", "auto")  # unset is Lightning's default
    threads, threads_why = farm_threads(recipe.setup, recipe.farm.threads)
    n_workers, gpu_ids = device_count(devices, accelerator, threads)
    if n_workers < 2 or os.environ.get("MIA_FARM_WORKER"):
        return n_workers, gpu_ids, None
    planned = prepare_experiment(recipe)
    if str(devices) not in AUTO_DEVICES or uses_gpu(accelerator):
        return n_workers, gpu_ids, None
    left = len(pending_models(recipe.experiment, resolve_shard(recipe.farm.shard).select(list(range(planned.keep.shape[0])))))
    n_workers = min(n_workers, max(left, 1))
    return n_workers, None, f"devices auto: {usable_cores()} cores at {threads} torch thread{'s' if threads > 1 else ''} per worker, {threads_why}"


CTRL_C_GRACE_S = 5.0
"""After a Ctrl-C, how long the workers (in the terminal's process group, so interrupted too) get to stop on their own."""

STOP_TIMEOUT_S = 60.0
"""How long interrupted workers get to release their claims before they are killed."""


def launch_device_workers(argv: list[str], n_workers: int, shard: Shard, gpu_ids: list[int] | None, use_gpu: bool) -> int:
    """Run ``n_workers`` farm processes concurrently; returns the first non-zero exit code, else 0 (an interruption stops them all).

    A worker that failed printed its own error; one killed by a signal (the out-of-memory killer's
    SIGKILL, a crash) could not, so that is raised here as ``MiaError``.
    """
    procs: list[subprocess.Popen] = []
    threads = max(1, usable_cores() // n_workers)
    try:
        for part in range(n_workers):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MIA_FARM_WORKER="1", **{PARENT_ENV: str(os.getpid())})
            if use_gpu:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu_ids[part] if gpu_ids else part)
            sub = shard.split(n_workers, part)
            command = [*package_command(), "farm", *argv, "--farm.shard", str(sub), "--trainer.devices", "1"]
            procs.append(subprocess.Popen(command, env=package_env(env)))
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        stop_workers(procs, grace_s=CTRL_C_GRACE_S if interrupt_signal() == signal.SIGINT else 0.0)
        raise
    killed = [f"worker {part} (shard {shard.split(n_workers, part)}) was killed by {signal_name(-code)}" for part, code in enumerate(codes) if code < 0]
    if killed:
        raise MiaError(f"farm: {'; '.join(killed)}{' (SIGKILL: often the out-of-memory killer)' if -signal.SIGKILL in codes else ''} "
                       "before it finished its models; finished models are kept: re-run the same command to resume")
    return next((code for code in codes if code), 0)


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; the number itself for a signal Python does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def stop_workers(procs: list[subprocess.Popen], grace_s: float, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Interrupt the workers still running after ``grace_s`` (SIGTERM: each stops as on Ctrl-C) and wait; kill those that outlast ``timeout_s``."""
    deadline = time.monotonic() + grace_s
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PACKAGE_MAIN = "import sys, runpy; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; runpy.run_module('mia_lightning', run_name='__main__', alter_sys=True)"
"""``python -m mia_lightning`` without the working directory on ``sys.path`` (``-c`` puts it first; ``-P`` needs Python 3.11)."""


def package_command() -> list[str]:
    """The command prefix that runs this process's ``mia_lightning`` package (``...`` + its arguments), never one in the working directory."""
    return [sys.executable, "-c", PACKAGE_MAIN]


def package_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``PYTHONPATH`` = the folder holding the package this process imported, then the absolute entries already there.

    Relative entries (``""``, ``.``) would mean the worker's current directory, so they are dropped.
    """
    home = str(Path(__file__).resolve().parents[2])  # the folder holding this process's mia_lightning/
    kept = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry and os.path.isabs(entry) and entry != home]
    return {**env, "PYTHONPATH": os.pathsep.join([home, *kept])}
