"""Progress of a vectorised group: one Lightning run trains K models through E epochs as one long stream of steps.

Lightning's own bar would show "epoch 0, step s of S". This one shows what the run means for the
farm: the epoch the K models are in, the step inside it, and a models-per-minute rate
extrapolated from the steps done so far, so the rate is meaningful from the first group on.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class GroupProgress(L.Callback):
    """Rich progress for one vectorised group: ``models 0-63  epoch 12/40  3.1k models/min``."""

    def __init__(self, model_ids: list[int], steps_per_epoch: int, total_steps: int, console: Console | None = None) -> None:
        self.label = f"models {model_ids[0]}-{model_ids[-1]}" if len(model_ids) > 1 else f"model {model_ids[0]}"
        self.n_models, self.steps_per_epoch, self.total_steps = len(model_ids), max(1, steps_per_epoch), total_steps
        self.console = console
        self.progress: Progress | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(self._description(0), total=self.total_steps, rate="")
        self.started = time.perf_counter()

    def _description(self, step: int) -> str:
        epochs = -(-self.total_steps // self.steps_per_epoch)
        return f"{self.label}  epoch {min(step // self.steps_per_epoch + 1, epochs)}/{epochs}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = batch_idx + 1
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        models_per_minute = self.n_models * done / self.total_steps / elapsed * 60
        self.progress.update(self.task, completed=done, description=self._description(done), rate=f"{models_per_minute:,.0f} models/min")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is not None:
            self.progress.stop()
