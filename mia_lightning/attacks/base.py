"""What every attack consumes (``AttackData``) and implements (``Attack``), plus the attack registry.

Attacks follow one convention: ``score(targets)`` returns, for each result name the attack writes,
a float64 array [len(targets), n_samples] where higher means "more likely a member" and NaN means
"no score" (left out of the metrics).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from scipy.special import logsumexp, softmax

from mia_lightning.errors import MiaError
from mia_lightning.experiment import ExperimentDir

log = logging.getLogger("mia_lightning")


def label_index(shape: tuple[int, ...], labels: np.ndarray) -> np.ndarray:
    """Index array [..., n, Q, 1] picking each sample's label on the class axis of an array [..., n, Q, C]."""
    return np.broadcast_to(labels.reshape((1,) * (len(shape) - 3) + (-1, 1, 1)), tuple(shape[:-1]) + (1,))


def true_class_values(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """values[..., j, a, y_j]: the true-class entry of each (sample, query), shape [..., n, Q]."""
    return np.take_along_axis(values, label_index(values.shape, labels), axis=-1)[..., 0]


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic phi = log p_y - log sum_{k != y} p_k, in float64, from logits [..., n, Q, C].

    Softmax normalisation cancels, so phi = z_y - logsumexp_{k != y} z_k: stable for confident models.
    """
    z = np.asarray(logits, dtype=np.float64)
    others = z.copy()
    np.put_along_axis(others, label_index(z.shape, labels), -np.inf, axis=-1)
    return true_class_values(z, labels) - logsumexp(others, axis=-1)


@dataclass
class AttackData:
    """Everything an attack sees: membership, labels and the models' outputs on the audit pool."""

    keep: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None = None
    signal: np.ndarray | None = None
    population: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.logits is None and self.signal is None:
            raise ValueError("AttackData needs logits [M, n, Q, C] or a signal [M, n, Q]")
        outputs = self.logits if self.logits is not None else self.signal
        if outputs.shape[:2] != self.keep.shape:
            raise MiaError(f"model outputs have shape {outputs.shape[:2]} but keep.npy is {self.keep.shape}")

    @classmethod
    def from_experiment(cls, experiment: ExperimentDir) -> "AttackData":
        """Load and validate an experiment directory (any exporter: only keep, labels and outputs needed)."""
        experiment.check_exists()
        experiment.check_version()
        kind = experiment.output_kind()
        outputs = experiment.load_model_outputs(kind)
        return cls(
            keep=experiment.keep,
            labels=experiment.labels,
            logits=outputs if kind == "logits" else None,
            signal=outputs if kind == "signal" else None,
            population=experiment.population,
        )

    @property
    def n_models(self) -> int:
        return self.keep.shape[0]

    @property
    def n_samples(self) -> int:
        return self.keep.shape[1]

    @cached_property
    def phi(self) -> np.ndarray:
        """float64 [M, n, Q]: the per-query confidence statistic (LiRA's phi, or the exported signal)."""
        if self.logits is not None:
            return logit_scaled_confidence(self.logits, self.labels)
        return np.asarray(self.signal, dtype=np.float64)

    @cached_property
    def true_class_probability(self) -> np.ndarray:
        """float64 [M, n]: softmax probability of the true label, averaged over queries."""
        return true_class_values(self.probabilities, self.labels).mean(axis=-1)

    @cached_property
    def probabilities(self) -> np.ndarray:
        """float64 [M, n, Q, C] softmax posteriors (needs logits)."""
        if self.logits is None:
            raise MiaError("this attack needs class logits (models/*/logits.npy); the experiment only exported signal.npy")
        return softmax(np.asarray(self.logits, dtype=np.float64), axis=-1)

    @cached_property
    def audit_mask(self) -> np.ndarray:
        """bool [n]: samples that count in the metrics (population samples are reference data, not audited)."""
        mask = np.ones(self.n_samples, dtype=bool)
        if self.population is not None:
            mask[self.population] = False
        return mask


class Attack(ABC):
    """A membership inference attack on an experiment's exported outputs.

    ``fit`` computes what is shared by all targets (e.g. sums over shadow models); ``score`` scores
    a batch of target model ids. ``outputs`` names the result sets ``score`` returns.
    """

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]
    requires_logits: ClassVar[bool] = False
    label: ClassVar[str | None] = None
    """How warnings name the attack (defaults to ``name``)."""

    def __init__(self) -> None:
        self.data: AttackData | None = None
        self._flagged: dict[str, set[int]] = {}

    def fit(self, data: AttackData) -> None:
        """Remember the data and precompute statistics shared by all targets."""
        if self.requires_logits and data.logits is None:
            raise MiaError(f"attack {self.name!r} needs class logits (models/*/logits.npy); this experiment exported signal.npy")
        self.data = data

    @abstractmethod
    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Scores float64 [len(targets), n_samples] per output name; higher = member, NaN = no score."""

    def params(self) -> dict[str, Any]:
        """Parameters recorded in results.json (after ``fit``, including tuned ones)."""
        return {}

    def flag_samples(self, flags: np.ndarray, reason: str) -> None:
        """Remember the samples (last axis of ``flags``) for which ``reason`` held for some target."""
        ids = np.flatnonzero(np.asarray(flags).reshape(-1, flags.shape[-1]).any(axis=0))
        self._flagged.setdefault(reason, set()).update(ids.tolist())

    def report_warnings(self) -> None:
        """Log, once after all targets are scored, how many samples fell back or were left out, per reason."""
        for reason, ids in self._flagged.items():
            if ids:
                log.warning("%s: %d samples have %s", self.label or self.name, len(ids), reason)


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an attack available as ``attack.py --attack <cls.name>``."""
    ATTACKS[cls.name] = cls
    return cls


def create_attack(name: str, **params: Any) -> Attack:
    """Instantiate a registered attack by name (like ``timm.create_model``)."""
    if name not in ATTACKS:
        raise MiaError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    try:
        return ATTACKS[name](**params)
    except TypeError as err:
        raise MiaError(f"attack {name!r}: bad parameters {params} ({err})") from None
