"""The attack as a LightningModule: ``Trainer.predict`` scores batches of target models.

``setup`` fits the attack's shared statistics once; each predict batch is a tensor of positions in
the target list, and ``predict_step`` writes its scores straight into preallocated float64 arrays
[T, n] per output (Lightning keeps no copy of the predictions, so scores exist once in memory). An
attack whose scoring is plain numpy (``Attack.threaded_scoring``) scores a share of each batch per thread.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mia_lightning.attacks.base import Attack, AttackData
from mia_lightning.interrupts import call_trainer
from mia_lightning.phases import Phase
from mia_lightning.runtime import numpy_parallel_map, numpy_threads


class AttackModule(L.LightningModule):
    """Wraps an ``Attack`` so Lightning drives scoring over target batches."""

    def __init__(self, attack: Attack, data: AttackData, targets: np.ndarray) -> None:
        super().__init__()
        self.attack = attack
        self.data = data
        self.targets = np.asarray(targets, dtype=np.int64)
        self.scores = {name: np.full((len(self.targets), data.n_samples), np.nan) for name in attack.outputs}

    def setup(self, stage: str) -> None:
        if self.attack.data is None:
            self.attack.fit(self.data)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        rows = batch.cpu().numpy()
        shares = np.array_split(rows, numpy_threads()) if self.attack.threaded_scoring else [rows]
        numpy_parallel_map(self._score_rows, [share for share in shares if share.size])

    def _score_rows(self, rows: np.ndarray) -> None:
        """Score the targets at positions ``rows`` into the preallocated arrays (threads write disjoint rows)."""
        for name, values in self.attack.score(self.targets[rows]).items():
            self.scores[name][rows] = values


class PhaseProgress(L.Callback):
    """Counts predict batches (target batches) into a ``Phase`` so a long scoring run shows progress and an ETA."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def on_predict_batch_end(self, *args: Any) -> None:
        self.phase.advance()


def score_targets(attack: Attack, data: AttackData, targets: np.ndarray, batch_size: int | None = None, purpose: str = "scoring") -> dict[str, np.ndarray]:
    """Run ``attack`` on ``targets`` with ``Trainer.predict``; returns float64 [len(targets), n] per output.

    The default batch keeps one float64 array of a batch's outputs near 16 MiB (``AttackData.target_batch_size``).
    ``purpose`` names the phase the user sees while it runs (fitting the attack, then one step per target batch).
    """
    module = AttackModule(attack, data, targets)
    loader = DataLoader(torch.arange(len(module.targets)), batch_size=batch_size or data.target_batch_size())
    with Phase(f"{attack.name}: fitting and {purpose} {len(module.targets)} targets", total=len(loader)) as phase:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[PhaseProgress(phase)])
        call_trainer(trainer.predict, module, loader, return_predictions=False)
    attack.report_warnings()
    return module.scores
