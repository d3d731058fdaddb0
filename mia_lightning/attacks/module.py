"""The attack as a LightningModule: ``Trainer.predict`` scores batches of target models.

``setup`` fits the attack's shared statistics once; each predict batch is a tensor of target ids.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mia_lightning.attacks.base import Attack, AttackData


class AttackModule(L.LightningModule):
    """Wraps an ``Attack`` so Lightning drives scoring over target batches."""

    def __init__(self, attack: Attack, data: AttackData) -> None:
        super().__init__()
        self.attack = attack
        self.data = data

    def setup(self, stage: str) -> None:
        if self.attack.data is None:
            self.attack.fit(self.data)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, np.ndarray]:
        return self.attack.score(batch.cpu().numpy())


def score_targets(attack: Attack, data: AttackData, targets: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run ``attack`` on ``targets`` with ``Trainer.predict``; returns float64 [len(targets), n] per output."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(torch.as_tensor(np.asarray(targets, dtype=np.int64)), batch_size=batch_size)
    batches = trainer.predict(AttackModule(attack, data), loader)
    attack.report_warnings()
    return {name: np.concatenate([batch[name] for batch in batches]).astype(np.float64) for name in attack.outputs}
