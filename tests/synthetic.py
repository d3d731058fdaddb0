"""Synthetic experiments for attack tests: no training, just a generative model of logits.

Each sample has a label, a difficulty (how confident every model is in its true class) and a
vulnerability (how much more confident a model becomes when it trains on it), so members get
higher true-class logits by a sample-dependent margin, like memorised training points. Each
non-population sample is in exactly half of the models (as the farm's plans do); the last
``n_population`` samples are in no model's training set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mia_lightning.attacks import AttackData


def synthetic_arrays(
    n_models: int = 8,
    n_samples: int = 60,
    n_queries: int = 1,
    n_classes: int = 4,
    n_population: int = 0,
    effect: float = 1.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(keep bool [M, n], labels int64 [n], logits float32 [M, n, Q, C], population ids or None)."""
    rng = np.random.default_rng(seed)
    audited = n_samples - n_population
    keep = np.zeros((n_models, n_samples), dtype=bool)
    for j in range(audited):
        keep[rng.permutation(n_models)[: n_models // 2], j] = True
    labels = rng.integers(0, n_classes, n_samples).astype(np.int64)
    difficulty = rng.normal(1.0, 1.0, n_samples)
    vulnerability = effect * rng.exponential(1.0, n_samples)
    logits = rng.normal(0.0, 1.0, (n_models, n_samples, n_queries, n_classes))
    boost = difficulty[None, :] + vulnerability[None, :] * keep + rng.normal(0.0, 0.5, (n_models, n_samples))
    logits[:, np.arange(n_samples), :, labels] += boost.T[:, :, None]
    population = np.arange(audited, n_samples, dtype=np.int64) if n_population else None
    return keep, labels, logits.astype(np.float32), population


def synthetic_attack_data(**kwargs) -> AttackData:
    """An in-memory ``AttackData`` from ``synthetic_arrays(**kwargs)``."""
    keep, labels, logits, population = synthetic_arrays(**kwargs)
    return AttackData(keep=keep, labels=labels, logits=logits, population=population)


def write_synthetic_experiment(root: Path, **kwargs) -> Path:
    """Write keep.npy, labels.npy, optional population.npy and models/NNNN/logits.npy under ``root``."""
    keep, labels, logits, population = synthetic_arrays(**kwargs)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "keep.npy", keep)
    np.save(root / "labels.npy", labels)
    if population is not None:
        np.save(root / "population.npy", population)
    for m, model_logits in enumerate(logits):
        folder = root / "models" / f"{m:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "logits.npy", model_logits)
    return root


def parent_plan(spec, labels=None, groups=None):
    """A test plan kind: models 0..N/2-1 on random halves, model N/2 + i continues from model i on the other half."""
    from mia_lightning.data.plan import Plan, make_lira_plan

    half = spec.n_models // 2
    keep = make_lira_plan(spec).keep
    keep[half:] = ~keep[:half]
    return Plan(keep, parents={half + i: i for i in range(half)}, info={"note": "test plan with parents"})
