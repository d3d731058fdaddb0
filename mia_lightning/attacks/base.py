"""What every attack consumes (``AttackData``) and implements (``Attack``), plus the attack registry.

Attacks follow one convention: ``score(targets)`` returns, for each result name the attack writes,
a float64 array [len(targets), n_samples] where higher means "more likely a member" and NaN means
"no score" (left out of the metrics).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import re
import threading
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from jsonargparse import ArgumentParser
from scipy.special import softmax

from mia_lightning.attacks.shadows import shadow_pool
from mia_lightning.errors import MiaError
from mia_lightning.runtime import numpy_parallel_map
from mia_lightning.contract.experiment import IMPORTED_KIND, ExperimentDir, plan_field_error
from mia_lightning.contract.io import finite_json
from mia_lightning.contract.model_outputs import ModelOutputs
from mia_lightning.data.plan import PLAN_KINDS, model_dependence

log = logging.getLogger("mia_lightning")


STATS_BLOCK_ELEMENTS = 2**23
"""Logit values converted to float64 at once when computing per-sample statistics (64 MiB)."""


def label_index(shape: tuple[int, ...], labels: np.ndarray) -> np.ndarray:
    """Index array [..., n, Q, 1] picking each sample's label on the class axis of an array [..., n, Q, C]."""
    return np.broadcast_to(labels.reshape((1,) * (len(shape) - 3) + (-1, 1, 1)), tuple(shape[:-1]) + (1,))


def true_class_values(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """values[..., j, a, y_j]: the true-class entry of each (sample, query), shape [..., n, Q]."""
    return np.take_along_axis(values, label_index(values.shape, labels), axis=-1)[..., 0]


def confidence_statistics(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phi, log p_y), both float64 [..., n, Q], from logits [..., n, Q, C], with one exp pass.

    phi = log p_y - log sum_{k != y} p_k is LiRA's statistic: the softmax normalisation cancels, so
    phi = z_y - lse_o with lse_o = logsumexp_{k != y} z_k, stable for confident models (never
    log(1 - p)); log p_y = z_y - logaddexp(z_y, lse_o). The classes are laid out as the leading
    axis so every reduction is an elementwise operation over all (model, sample, query) rows.
    """
    z = np.asarray(logits)
    lead, n_classes = z.shape[:-1], z.shape[-1]
    rows = np.ascontiguousarray(z.reshape(-1, n_classes).T, dtype=np.float64)  # [C, N]
    y = np.broadcast_to(np.asarray(labels).reshape((1,) * (len(lead) - 2) + (-1, 1)), lead).reshape(-1)
    flat = y * rows.shape[1] + np.arange(rows.shape[1])  # position of (y_i, i) in rows.ravel(): 1-D takes beat 2-D fancy indexing
    z_y = np.take(rows.ravel(), flat)
    np.put(rows.ravel(), flat, -np.inf)
    top = rows.max(axis=0)
    np.subtract(rows, top, out=rows)
    np.exp(rows, out=rows)
    lse_others = top + np.log(rows.sum(axis=0))
    phi = z_y - lse_others
    log_p_y = z_y - np.logaddexp(z_y, lse_others)
    return phi.reshape(lead), log_p_y.reshape(lead)


def check_plan_kind(experiment: ExperimentDir) -> None:
    """Refuse, before any outputs are read, a plan.json (checked whole on reading) whose ``kind`` no plan function builds:
    the kind decides which attacks and epsilon audits apply, so a typo must not pass silently."""
    kinds = sorted({*PLAN_KINDS, IMPORTED_KIND})
    kind = experiment.plan.get("kind", IMPORTED_KIND)
    if kind not in kinds:
        raise plan_field_error(experiment.plan_path, "kind", repr(kind), f"one of {', '.join(kinds)}")


@dataclass
class AttackData:
    """Everything an attack sees: membership, labels and the models' outputs on the audit pool.

    ``logits`` / ``signal`` are ``ModelOutputs`` (in-memory arrays are wrapped): index them by model
    ids to get a new float array; per-sample statistics (``phi``, ``log_true_class``) are computed
    block by block, so no float64 copy of all logits ever exists. ``audit`` (bool [M, n], optional)
    says which samples count in the metrics when model m is the target; ``groups`` holds user ids;
    ``features`` (float [n, F], optional) the samples' inputs for attacks that model them (quantile
    regression; read from the experiment's DataModule when not given).
    """

    keep: np.ndarray
    labels: np.ndarray
    logits: ModelOutputs | np.ndarray | None = None
    signal: ModelOutputs | np.ndarray | None = None
    population: np.ndarray | None = None
    groups: np.ndarray | None = None
    audit: np.ndarray | None = None
    experiment: ExperimentDir | None = None
    features: np.ndarray | None = None
    signal_columns: dict[str, ModelOutputs] | None = None
    """Named signal kinds [M, n, 1] when the models export several (a causal LM's ``signal.npy`` columns); ``signal`` is then the first."""

    def __post_init__(self) -> None:
        if self.logits is None and self.signal is None:
            raise ValueError("AttackData needs logits [M, n, Q, C] or a signal [M, n, Q]")
        if self.logits is not None and not isinstance(self.logits, ModelOutputs):
            self.logits = ModelOutputs.in_memory(self.logits)
        if self.signal is not None and not isinstance(self.signal, ModelOutputs):
            self.signal = ModelOutputs.in_memory(self.signal)
        outputs = self.logits if self.logits is not None else self.signal
        if outputs.shape[:2] != self.keep.shape:
            raise MiaError(f"model outputs have shape {outputs.shape[:2]} but keep.npy is {self.keep.shape}")

    @classmethod
    def from_experiment(cls, experiment: ExperimentDir) -> "AttackData":
        """Load and validate an experiment directory (any exporter: only keep, labels and outputs needed)."""
        experiment.check_exists()
        experiment.check_version()
        check_plan_kind(experiment)
        kind = experiment.output_kind()
        outputs = experiment.load_model_outputs(kind)
        columns = experiment.signal_columns if kind == "signal" else None
        if columns is not None and len(columns) != outputs.shape[2]:
            raise MiaError(
                f"{experiment.plan_path}: signals.columns names {len(columns)} signal kinds but signal.npy has {outputs.shape[2]} columns; "
                "re-export the models (`python train.py export`) or fix the file"
            )
        named = None if columns is None else {name: outputs.column(i) for i, name in enumerate(columns)}
        return cls(
            keep=experiment.keep,
            labels=experiment.labels,
            logits=outputs if kind == "logits" else None,
            signal=(named[columns[0]] if named else outputs) if kind == "signal" else None,
            signal_columns=named,
            population=experiment.population,
            groups=experiment.groups,
            audit=experiment.audit,
            experiment=experiment,
        )

    @property
    def n_models(self) -> int:
        return self.keep.shape[0]

    @property
    def n_samples(self) -> int:
        return self.keep.shape[1]

    @property
    def outputs(self) -> ModelOutputs:
        """The exported outputs, whichever kind the experiment has."""
        return self.logits if self.logits is not None else self.signal

    def target_batch_size(self, cap: int = 64) -> int:
        """Targets per scoring batch so that one float64 array of their outputs stays near 16 MiB (attacks make dozens)."""
        per_target = int(np.prod(self.outputs.shape[1:]))
        return int(np.clip(2**21 // max(per_target, 1), 1, cap))

    def _logit_statistic(self, which: int) -> np.ndarray:
        """float64 [M, n, Q] of ``confidence_statistics``' output ``which`` (0: phi, 1: log p_y), block by block over models.

        Blocks are read and reduced by one thread per core (numpy releases the GIL in its loops);
        each holds one block of float64 temporaries at a time.
        """
        M, n, Q, C = self.logits.shape
        values = np.empty((M, n, Q))
        size = max(1, STATS_BLOCK_ELEMENTS // (n * Q * C))

        def fill(start: int) -> None:
            stop = min(start + size, M)
            values[start:stop] = confidence_statistics(self.logits[start:stop], self.labels)[which]

        numpy_parallel_map(fill, range(0, M, size))
        return values

    @cached_property
    def phi(self) -> np.ndarray:
        """float64 [M, n, Q]: the per-query confidence statistic (LiRA's phi, or the exported signal)."""
        if self.logits is None:
            return np.asarray(self.signal[:], dtype=np.float64)
        return self._logit_statistic(0)

    @cached_property
    def log_true_class(self) -> np.ndarray:
        """float64 [M, n, Q]: log-likelihood of each sample under each model, per query.

        From logits: the log softmax probability of the true label (its own pass over the outputs).
        From a signal: the signal itself, read as a log-likelihood (e.g. minus an MLM loss, the mean
        log-probability of the masked tokens), so RMIA's p = exp(signal) and attack R's loss = -signal.
        """
        if self.logits is None:
            values = np.asarray(self.signal[:], dtype=np.float64)
            if (np.exp(values) == 0).any():
                raise MiaError(
                    "exp(signal) underflows to 0 for some samples: RMIA and attack R read a signal as a mean log-likelihood "
                    "(e.g. minus a per-token loss), not a summed one; export a per-token signal (MaskedLM signal: loss or energy)"
                )
            return values
        return self._logit_statistic(1)

    @cached_property
    def true_class_probability(self) -> np.ndarray:
        """float64 [M, n]: softmax probability of the true label (exp of a signal), averaged over queries."""
        return np.exp(self.log_true_class).mean(axis=-1)

    @cached_property
    def loss(self) -> np.ndarray:
        """float64 [M, n]: cross-entropy -log p_y (minus a signal), averaged over queries."""
        return -self.log_true_class.mean(axis=-1)

    def posteriors(self, models: np.ndarray) -> np.ndarray:
        """float64 [k, n, Q, C] softmax posteriors of the given models (needs logits)."""
        if self.logits is None:
            raise MiaError("this attack needs class logits (models/*/logits.npy); the experiment only exported signal.npy")
        return softmax(np.asarray(self.logits[np.asarray(models)], dtype=np.float64), axis=-1)

    @cached_property
    def dependence(self) -> str | None:
        """Why the experiment's models are not independent training runs (``data.plan.model_dependence``), or None."""
        return model_dependence(self.experiment.plan) if self.experiment is not None else None

    @cached_property
    def shadow_candidates(self) -> int:
        """C: models 0..C-1 may serve as shadow / reference models of LiRA, RMIA and attack R.

        Reference models a plan trained on other (public) data, listed in plan.json as
        ``info.reference_models``, are the last ids and never shadows: they are never IN, so they
        would bias every OUT fit.
        """
        plan = self.experiment.plan if self.experiment is not None else {}
        references = sorted(int(m) for m in plan.get("info", {}).get("reference_models", []))
        if references and references == list(range(self.n_models - len(references), self.n_models)):
            return self.n_models - len(references)
        if references:
            log.warning("plan.json lists reference models %s that are not the last model ids; they stay in the shadow pools", references)
        return self.n_models

    @cached_property
    def audit_mask(self) -> np.ndarray:
        """bool [n]: samples that count in the metrics (population samples are reference data, not audited)."""
        mask = np.ones(self.n_samples, dtype=bool)
        if self.population is not None:
            mask[self.population] = False
        return mask

    def audit_pairs(self, targets: np.ndarray) -> np.ndarray:
        """bool [T, n]: the (target, sample) pairs that count in the metrics (``audit.npy`` rows, minus the population)."""
        rows = np.broadcast_to(self.audit_mask, (len(targets), self.n_samples))
        return rows & self.audit[np.asarray(targets)] if self.audit is not None else rows.copy()


class Attack(ABC):
    """A membership inference attack on an experiment's exported outputs.

    ``fit`` computes what is shared by all targets (e.g. sums over shadow models); ``score`` scores
    a batch of target model ids. ``outputs`` names the result sets ``score`` returns.
    """

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]
    requires_logits: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    """Models the experiment needs (2 for attacks that fit shadow / reference models besides the target)."""
    shadow_free: ClassVar[bool] = False
    """Whether a target's scores depend on the target model's outputs alone (no shadow or reference models)."""
    independent_models: ClassVar[bool] = True
    """Whether the attack assumes every model is an independent training run (shadows drawn like the target, targets pooled
    as independent trials); such attacks are skipped on farms whose models derive from each other (unlearning plans)."""
    label: ClassVar[str | None] = None
    """How warnings name the attack (defaults to ``name``)."""
    threaded_scoring: ClassVar[bool] = False
    """Whether ``score`` is numpy array work that only reads what ``fit`` computed (and ``flag_samples``), so scoring may
    split a batch of targets over threads (``attacks/module.py``); attacks that run torch models or sklearn stay serial."""

    def __init__(self) -> None:
        self.data: AttackData | None = None
        self._flagged: dict[str, set[int]] = {}
        self._flag_lock = threading.Lock()

    def shadow_pool(self, n_candidates: int) -> tuple[int, int | None]:
        """``shadows.shadow_pool`` for an attack with an ``n_shadows`` parameter: its error names ``--params <name>.n_shadows``."""
        return shadow_pool(n_candidates, self.n_shadows, f"--params {self.name}.n_shadows")

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        """Why this attack cannot run on ``data`` (one phrase), or None; ``--attack all`` skips such attacks with a note."""
        if cls.requires_logits and data.logits is None:
            return "needs class logits (models/*/logits.npy) and this experiment exported signal.npy"
        if cls.independent_models and data.dependence:
            return f"assumes independent training runs, but {data.dependence}"
        if data.n_models < cls.min_models:
            return f"needs at least {cls.min_models} models (a target and shadow/reference models), the experiment has {data.n_models}"
        return None

    def fit(self, data: AttackData) -> None:
        """Remember the data and precompute statistics shared by all targets."""
        problem = self.unmet_requirement(data)
        if problem:
            raise MiaError(f"attack {self.name!r} {problem}")
        self.data = data

    @abstractmethod
    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Scores float64 [len(targets), n_samples] per output name; higher = member, NaN = no score."""

    def params(self) -> dict[str, Any]:
        """Parameters recorded in results.json (after ``fit``, including tuned ones)."""
        return {}

    def decision_record(self, name: str, scores: np.ndarray, members: np.ndarray, bootstrap: int, groups: np.ndarray | None = None) -> dict:
        """Extra results.json entries for output ``name`` from its audited [T, n] scores (NaN = not audited), e.g. an attack's own decision rule.

        ``groups``: the experiment's user of each sample (``groups.npy``), the unit a bootstrap resamples."""
        return {}

    def flag_samples(self, flags: np.ndarray, reason: str) -> None:
        """Remember the samples (last axis of ``flags``) for which ``reason`` held for some target."""
        ids = np.flatnonzero(np.asarray(flags).reshape(-1, flags.shape[-1]).any(axis=0))
        with self._flag_lock:
            self._flagged.setdefault(reason, set()).update(ids.tolist())

    def report_warnings(self) -> None:
        """Log, once after all targets are scored, how many samples fell back or were left out, per reason."""
        for reason, ids in self._flagged.items():
            if ids:
                log.warning("%s: %d samples have %s", self.label or self.name, len(ids), reason)


BUILT_IN_ATTACKS: dict[str, str] = {
    "lira": "lira", "rmia": "rmia", "likelihood_ratio": "mlm", "loss_baseline": "mlm", "blind_baseline": "mlm",
    "reference": "reference", "shokri": "shokri", "thresholds": "thresholds", "ulira": "ulira", "unlearning": "unlearning",
    "quantile": "quantile", "label_only": "label_only", "lm_signals": "causal_lm",
}
"""Built-in attack name -> the module of ``mia_lightning.attacks`` that registers it. Modules are imported on
first use; none imports torch at the top (their models are trained in ``classifiers.py`` / ``quantile_regressor.py``, loaded to score),
so attack names, parameters, ``--help`` and typos are answered without importing torch."""

BUILT_IN_OUTPUTS: dict[str, tuple[str, ...]] = {
    "lira": ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold"),
    "rmia": ("rmia_online", "rmia_offline"), "likelihood_ratio": ("likelihood_ratio", "reference_only"),
    "loss_baseline": ("loss_baseline",), "blind_baseline": ("blind_baseline",), "reference": ("reference_attack_r",),
    "shokri": ("shokri_per_class", "shokri_shared"), "thresholds": ("loss", "confidence", "entropy", "modified_entropy"),
    "ulira": ("ulira_exact", "ulira_inexact", "lira_before", "loss_exact", "loss_inexact", "retained_exact", "retained_inexact", "retained_before"),
    "quantile": ("quantile_regression",), "label_only": ("label_only_agreement", "label_only_lira"),
    "lm_signals": ("zlib_ratio", "min_k", "min_k_plus_plus"),
}
"""The outputs each built-in attack writes (its class's ``outputs``; the unlearning attack's depend on its parameters),
so an output name typed as an attack is answered with its family without importing the attack modules."""


class AttackRegistry(Mapping):
    """Attack name -> class: the built-in attacks (imported lazily) and any class registered with ``register_attack``."""

    def __init__(self, modules: dict[str, str]) -> None:
        self._modules = dict(modules)
        self._classes: dict[str, type[Attack]] = {}

    def register(self, cls: type[Attack]) -> None:
        self._classes[cls.name] = cls

    def outputs(self) -> dict[str, tuple[str, ...]]:
        """Attack name -> the outputs it writes, without importing any attack module (built-ins from ``BUILT_IN_OUTPUTS``)."""
        registered = {name: cls.outputs for name, cls in self._classes.items() if isinstance(getattr(cls, "outputs", None), tuple)}
        return {**BUILT_IN_OUTPUTS, **registered}

    def __getitem__(self, name: str) -> type[Attack]:
        if name not in self._classes and name in self._modules:
            importlib.import_module(f"mia_lightning.attacks.{self._modules[name]}")
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules or name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._modules, *self._classes]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self._modules, *self._classes]))


ATTACKS = AttackRegistry(BUILT_IN_ATTACKS)


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an attack available as ``attack.py --attack <cls.name>``."""
    ATTACKS.register(cls)
    return cls


def accepts_none(annotation: Any, default: Any) -> bool:
    """Whether a parameter may be None: its annotation is Any or includes None (``int | None``), or None is its default."""
    return default is None or annotation is Any or annotation is type(None) or type(None) in typing.get_args(annotation)


def check_params(name: str, params: Any) -> dict[str, Any]:
    """Validate ``--params`` for one attack against its ``__init__`` signature (names, types, no None where the type has none,
    finite numbers); returns the typed values. Cheap: it runs before torch loads for most attacks."""
    if not isinstance(params, dict):
        raise MiaError(f"--params {name}: expected an object of parameters such as {{\"n_shadows\": 8}}, got {params!r}")
    cls = ATTACKS[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls)
    known = [action.dest for action in parser._actions if action.dest not in ("help", "config")]
    signature = inspect.signature(cls.__init__).parameters

    def wrong_type(key: str, what: str = "") -> MiaError:
        annotation = signature.get(key)
        expected = annotation.annotation if annotation is not None else "another type"
        return MiaError(f"--params {name}.{key}={params.get(key)!r}: expected {what}{expected}")

    try:
        parsed = parser.parse_object(params)
    except argparse.ArgumentError as err:
        text = " ".join(str(err).split())
        unknown = re.search(r"Option '([^']+)' is not accepted", text)
        if unknown:
            raise MiaError(f"--params {name}.{unknown.group(1)}: unknown parameter; {name} takes {', '.join(known) or 'none'}") from None
        key = re.search(r'key "([^"]+)"', text)
        raise wrong_type(key.group(1) if key else "?") from None
    values = {key: value for key, value in parsed.as_dict().items() if key in params}
    hints = typing.get_type_hints(cls.__init__)
    for key, value in values.items():
        if value is None and not accepts_none(hints.get(key, Any), signature[key].default):
            raise wrong_type(key)
        if finite_json(value) != value:  # NaN or infinity (JSON 1e400), alone or in a list
            raise wrong_type(key, "a finite ")
    return values


def unknown_attack_hint(name: str, extra_choices: tuple[str, ...] = ()) -> str:
    """Why ``name`` is not an attack and what to type instead: the family an output name belongs to, or the nearest names."""
    families = [(family, outputs) for family, outputs in ATTACKS.outputs().items() if name in outputs]
    if families:
        family, outputs = families[0]
        return f"{name!r} is an output of the {family!r} attack (it writes {', '.join(outputs)}); use --attack {family}"
    choices = [*sorted(ATTACKS), *extra_choices]
    close = difflib.get_close_matches(name, choices, n=2, cutoff=0.6)
    suggestion = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown attack {name!r}; {suggestion}available: {', '.join(choices)}"


def create_attack(name: str, **params: Any) -> Attack:
    """Instantiate a registered attack by name (like ``timm.create_model``), its parameters checked first."""
    if name not in ATTACKS:
        raise MiaError(unknown_attack_hint(name))
    return ATTACKS[name](**check_params(name, params))
