"""How attack success grows with the number of shadow / reference models (the few-shadow curve).

For each reference count k, LiRA (online, offline, per-sample and fixed variance) and RMIA (online,
offline) use only the k lowest-id models other than the target (``n_shadows=k``, see
``attacks/shadows.py``) and are scored leave-one-out on the same targets. With few shadows many
samples have fewer than 2 IN (or OUT) shadows, or none: that is the regime being measured, so the
attacks' per-fallback warnings are replaced by one log line per attack run saying how many
(target, sample) pairs went unscored.

Writes ``few_shadow/few_shadow.json`` (rows) and ``few_shadow.png`` (metrics vs k, log x) into an attack run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.errors import MiaError
from mia_lightning.contract.io import save_json_atomic
from mia_lightning.metrics import membership_metrics
from mia_lightning.report.figures import plot_few_shadow

log = logging.getLogger("mia_lightning")

SHADOW_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
CURVE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "lira": ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed"),
    "rmia": ("rmia_online", "rmia_offline"),
}
ROW_METRICS: tuple[str, ...] = ("auc", "tpr@0.001", "tpr@0.01")
BATCH = 64


def _row(n_shadows: int, name: str, scores: np.ndarray, members: np.ndarray) -> dict:
    """One curve point; metrics are None when the scored pairs lack members or non-members."""
    n_scored = int(np.isfinite(scores).sum())
    row: dict = {"n_shadows": n_shadows, "attack": name, "n_scored": n_scored}
    try:
        metrics = membership_metrics(scores, members, fpr_levels=(0.001, 0.01))
    except ValueError:
        return row | {key: None for key in ROW_METRICS}
    return row | {"auc": metrics["auc"], "tpr@0.001": metrics["tpr_at_fpr"]["0.001"], "tpr@0.01": metrics["tpr_at_fpr"]["0.01"]}


def few_shadow_curve(data: AttackData, targets: np.ndarray, shadow_counts: Sequence[int] = SHADOW_COUNTS) -> list[dict]:
    """Rows {n_shadows, attack, n_scored, auc, tpr@0.001, tpr@0.01}; a count above the shadow candidates less one becomes that (all shadows).

    The pairs scored are the audit's (``AttackData.audit_pairs``: the plan's audited rows, without the
    population), so the curve's point at all shadows matches the run's own results.
    """
    targets = np.asarray(targets, dtype=np.int64)
    members = data.keep[targets]
    audited = data.audit_pairs(targets)
    candidates = data.shadow_candidates  # reference models trained on other data (``info.reference_models``) are never shadows
    if candidates < 2:
        raise MiaError(f"few-shadow: needs at least 2 models that can serve as shadows, the experiment has {candidates}")
    usable = sorted({min(k, candidates - 1) for k in shadow_counts if k >= 1})
    rows = []
    for k in usable:
        for family, outputs in CURVE_OUTPUTS.items():
            attack = create_attack(family, n_shadows=k)
            with np.errstate(divide="ignore", invalid="ignore"):  # zero-spread fits are expected with few shadows: unscored, counted below
                attack.fit(data)
                batches = [attack.score(targets[i : i + BATCH]) for i in range(0, targets.size, BATCH)]
            unscored = []
            for name in outputs:
                scores = np.where(audited, np.concatenate([batch[name] for batch in batches]), np.nan)
                rows.append(_row(k, name, scores, members))
                unscored.append(f"{name} {int(audited.sum()) - rows[-1]['n_scored']}")
            settings = {key: value for key, value in attack.params().items() if not isinstance(value, dict)}
            log.debug("few-shadow %s %s: unscored (target, sample) pairs: %s", family, settings, ", ".join(unscored))
    return rows


def write_few_shadow(data: AttackData, targets: np.ndarray, path: Path, title: str, shadow_counts: Sequence[int] = SHADOW_COUNTS) -> list[dict]:
    """Compute the curve and write it to ``path`` (an attack run's ``few_shadow/few_shadow.json``) with ``few_shadow.png`` beside it."""
    rows = few_shadow_curve(data, targets, shadow_counts)
    save_json_atomic(Path(path), {"targets": np.asarray(targets).tolist(), "shadow_counts": list(shadow_counts), "rows": rows})
    plot_few_shadow(rows, Path(path).with_name("few_shadow.png"), f"few-shadow curve ({title})", ROW_METRICS)
    return rows
