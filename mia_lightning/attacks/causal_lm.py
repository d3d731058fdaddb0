"""Shadow-free attacks on a causal LM's named signals: the zlib ratio, Min-K% and Min-K%++.

A ``CausalLM`` exports, per text, the columns of ``models.causal_lm.SIGNALS`` into ``signal.npy``
(named in ``plan.json`` ``signals``). Each output here is the target model's column of that name
(higher = more member-like), with no shadow or reference model:

- ``zlib_ratio``: minus the mean token loss over the text's zlib size (Carlini et al., USENIX Security 2021);
- ``min_k``: the mean of the k% lowest token log-probabilities (Shi et al., ICLR 2024);
- ``min_k_plus_plus``: the mean of the k% lowest token log-probabilities standardised by the mean and
  std of log p under the model's next-token distribution (Zhang et al. 2024).

The mean token loss itself is ``loss_baseline``, the reference-model ratio is ``likelihood_ratio``
and LiRA / RMIA read the same first column (``attacks/mlm.py``, ``lira``, ``rmia``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import AttackData, register_attack
from mia_lightning.attacks.mlm import SignalAttack

COLUMNS: tuple[str, ...] = ("zlib_ratio", "min_k", "min_k_plus_plus")


@register_attack
class LanguageModelSignals(SignalAttack):
    """The target's zlib ratio, Min-K% and Min-K%++ columns, each an attack score (see the module docstring)."""

    name = "lm_signals"
    label = "LM signals"
    outputs = COLUMNS
    shadow_free = True

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        missing = [c for c in COLUMNS if data.signal_columns is None or c not in data.signal_columns]
        if data.signal is not None and missing:
            return f"needs a causal LM's signal columns ({', '.join(COLUMNS)}; plan.json signals.columns), this experiment's signal.npy has no {missing[0]} column"
        return super().unmet_requirement(data)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.asarray(self.data.signal_columns[name][targets], dtype=np.float64)[..., 0] for name in COLUMNS}

    def params(self) -> dict[str, Any]:
        layout = self.data.experiment.plan.get("signals", {}) if self.data.experiment is not None else {}
        return {key: value for key, value in layout.items() if key != "columns"}
