"""Membership plans: which pool samples each model trains on (``keep.npy`` + ``plan.json``).

The LiRA plan puts every sample IN for exactly half of the models (floor/ceil when N is odd) and
gives every model as equal a share of the pool as possible; optional population samples are
reserved for no model. Same arguments, same plan, bit for bit (numpy PCG64 seeded once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mia_lightning.experiment import FORMAT_VERSION


@dataclass(frozen=True)
class PlanSpec:
    """What a plan is made from; stored in ``plan.json`` with the layout version."""

    dataset: str
    n_samples: int
    n_models: int
    seed: int = 0
    kind: str = "lira_half"
    n_population: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "version": FORMAT_VERSION}


def _balance_rows(keep: np.ndarray, rng: np.random.Generator) -> None:
    """Swap IN/OUT pairs inside columns until row sums differ by at most one (column sums unchanged)."""
    while True:
        rows = keep.sum(axis=1)
        high, low = int(np.argmax(rows)), int(np.argmin(rows))
        if rows[high] - rows[low] <= 1:
            return
        movable = np.flatnonzero(keep[high] & ~keep[low])
        column = rng.choice(movable)
        keep[high, column], keep[low, column] = False, True


def make_lira_plan(spec: PlanSpec) -> tuple[np.ndarray, np.ndarray]:
    """(keep bool [n_models, n_samples], population int64 ids) for a LiRA-style random-halves plan."""
    if spec.n_models < 2:
        raise ValueError("a membership plan needs at least 2 models")
    if not 0 <= spec.n_population < spec.n_samples - 1:
        raise ValueError(f"n_population={spec.n_population} must leave at least 2 audit samples of {spec.n_samples}")
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(spec.n_samples)
    population = np.sort(order[: spec.n_population]).astype(np.int64)
    audit = np.sort(order[spec.n_population :])
    n_in = np.full(audit.size, spec.n_models // 2)
    if spec.n_models % 2:
        n_in[rng.permutation(audit.size)[: audit.size // 2]] += 1
    ranks = np.argsort(rng.random((spec.n_models, audit.size)), axis=0).argsort(axis=0)
    sub = ranks < n_in[None, :]
    _balance_rows(sub, rng)
    keep = np.zeros((spec.n_models, spec.n_samples), dtype=bool)
    keep[:, audit] = sub
    return keep, population
