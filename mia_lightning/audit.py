"""Stage 4: run attacks on an experiment directory and write ``attacks/<name>/{results.json,scores.npy,roc.png}``.

Everything is validated and scored before anything is written, so bad input never clobbers
earlier results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.errors import MiaError
from mia_lightning.experiment import ExperimentDir
from mia_lightning.io import save_json_atomic, save_npy_atomic
from mia_lightning.metrics import RocCurve, evaluate_scores
from mia_lightning.privacy.epsilon import empirical_epsilon
from mia_lightning.report import plot_roc

log = logging.getLogger("mia_lightning")


def resolve_targets(n_models: int, targets: Sequence[int] | None, n_targets: int | None) -> np.ndarray:
    """Target model ids: explicit ``targets``, else the first ``n_targets``, else every model."""
    if targets:
        ids = np.asarray(targets, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n_models)]
        if bad.size:
            raise MiaError(f"--targets {bad.tolist()}: out of range, the experiment has models 0..{n_models - 1}")
        if len(set(ids.tolist())) != ids.size:
            raise MiaError("--targets: each target id may appear once")
        return ids
    count = n_models if n_targets is None else n_targets
    if not 1 <= count <= n_models:
        raise MiaError(f"--n_targets {count}: must be between 1 and the number of models ({n_models})")
    return np.arange(count, dtype=np.int64)


def result_record(name: str, family: str, params: dict, targets: np.ndarray, scores: np.ndarray, members: np.ndarray) -> tuple[dict, RocCurve]:
    """The results.json payload of one attack output (schema in DESIGN.md / README) and its ROC curve."""
    n_missing = int(np.isnan(scores).sum())
    if n_missing:
        log.warning("%s: %d (target, sample) pairs have no score and are left out of the metrics", name, n_missing)
    metrics, curve = evaluate_scores(scores, members)
    record = {
        "attack": name,
        "family": family,
        "params": params,
        "targets": targets.tolist(),
        "n_unscored": n_missing,
        **metrics,
        "empirical_epsilon": empirical_epsilon(scores, members),
    }
    return record, curve


def run_audit(
    experiment_dir: Path,
    attacks: Sequence[str],
    targets: Sequence[int] | None = None,
    n_targets: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
) -> list[dict]:
    """Score every requested attack, then write all results; returns the results.json records."""
    experiment = ExperimentDir(Path(experiment_dir))
    created = [(family, create_attack(family, **(params or {}).get(family, {}))) for family in attacks]  # bad names fail first
    data = AttackData.from_experiment(experiment)
    target_ids = resolve_targets(data.n_models, targets, n_targets)
    members = data.keep[target_ids][:, data.audit_mask]
    outputs: list[tuple[dict, RocCurve, np.ndarray]] = []
    for family, attack in created:
        scored = score_targets(attack, data, target_ids)
        for name, scores in scored.items():
            audited = scores[:, data.audit_mask]
            try:
                record, curve = result_record(name, family, attack.params(), target_ids, audited, members)
            except ValueError as err:
                raise MiaError(f"{experiment.root}: attack {name}: {err}; choose targets with both members and non-members") from None
            outputs.append((record, curve, scores))
    curves = {}
    for record, curve, scores in outputs:
        folder = experiment.attack_dir(record["attack"])
        curves[record["attack"]] = curve
        save_npy_atomic(folder / "scores.npy", scores)
        save_json_atomic(folder / "results.json", record)
        plot_roc({record["attack"]: curve}, folder / "roc.png", f"{record['attack']} ({experiment.root.name})")
    plot_roc(curves, experiment.attacks_dir / "roc.png", f"membership inference on {experiment.root.name}")
    return [record for record, _, _ in outputs]
