"""``unlearning.json``: which models of an experiment are original and unlearned versions, and what each step changed.

Original and unlearned models are ordinary models of the experiment; each keep row says what the
model stands for (the training set an exact method would train on). This file adds how they are
related. Format (version 1)::

    {
      "format": "mia-lightning-unlearning", "version": 1,
      "design": "scenarios" | "ulira",
      "scenario": "single" | "group" | "multi_version" | "online" | "remaining",
      "evaluate": "deleted" | "added" | "remaining",   # the samples the attacks test by default
      "methods": ["scratch"],                          # unlearning methods in the file; the first is the attacks' default
      "aggregation": "mean" | "vote",                  # how a version made of several models (SISA shards) answers
      "chains": [{
        "method": "scratch", "role": "shadow" | "target",
        "versions": [[0], [20], ...],                  # model ids of each version (several ids: a SISA ensemble of shards)
        "steps": [{"deleted": [...], "added": [...], "remaining": [...], "negatives": [...]}, ...]
      }, ...],
      "training": {"20": {"method": "finetune", "epochs": 5}, ...}   # how the unlearning engine trains a model
    }

Step i turns ``versions[i]`` into ``versions[i + 1]``: ``deleted`` samples are in the training set of
``versions[i]`` and not in that of ``versions[i + 1]``, ``added`` the reverse; ``remaining`` are
retained samples (in both) drawn for the remaining-samples evaluation; ``negatives`` are samples in
no version of the chain, drawn as the attacks' negatives. A version's training set is the union of
its models' keep rows.

The row (target model id in ``scores.npy``) of an evaluated sample is the model whose keep row holds
the positive, so ``keep[row]`` is the ground truth the shared metrics use: for deleted and remaining
samples the chain's first version, for added samples the version right after the step; in a SISA
ensemble the shard model holding the sample. A step's negatives take the row of its first positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json

FILENAME = "unlearning.json"
FORMAT = "mia-lightning-unlearning"
VERSION = 1
DESIGNS = ("scenarios", "ulira")
SCENARIOS = ("single", "group", "multi_version", "online", "remaining")
EVALUATIONS = ("deleted", "added", "remaining")
METHODS = ("scratch", "sisa", "finetune", "gradient_ascent")
AGGREGATIONS = ("mean", "vote")
ROLES = ("shadow", "target")
SAMPLE_SETS = ("deleted", "added", "remaining", "negatives")


def _ids(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"expected a flat list of ids, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class Step:
    """One unlearning (or update) step: int64 sample ids deleted, added, kept (evaluated) and never used (negatives)."""

    deleted: np.ndarray
    added: np.ndarray
    remaining: np.ndarray
    negatives: np.ndarray

    def to_json(self) -> dict:
        return {name: getattr(self, name).tolist() for name in SAMPLE_SETS}


@dataclass(frozen=True)
class Chain:
    """An original and its successive versions (one id per version, or a SISA ensemble's shard ids) and the steps between them."""

    method: str
    role: str
    versions: tuple[tuple[int, ...], ...]
    steps: tuple[Step, ...]

    @property
    def original(self) -> tuple[int, ...]:
        return self.versions[0]

    def to_json(self) -> dict:
        return {"method": self.method, "role": self.role, "versions": [list(v) for v in self.versions], "steps": [s.to_json() for s in self.steps]}


@dataclass(frozen=True)
class Unlearning:
    """The parsed ``unlearning.json``."""

    design: str
    scenario: str
    evaluate: str
    methods: tuple[str, ...]
    aggregation: str
    chains: tuple[Chain, ...]
    training: dict[int, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "design": self.design, "scenario": self.scenario, "evaluate": self.evaluate,
            "methods": list(self.methods), "aggregation": self.aggregation, "chains": [c.to_json() for c in self.chains],
            "training": {str(k): v for k, v in sorted(self.training.items())},
        }

    def chains_of(self, method: str) -> list[Chain]:
        """The chains of one unlearning method."""
        return [chain for chain in self.chains if chain.method == method]

    def resolve_method(self, method: str | None, who: str) -> str:
        """``method`` if the file has it, else the file's first method; a one-line error naming the choices."""
        if method is None:
            return self.methods[0]
        if method not in self.methods:
            raise MiaError(f"--params {who}.method {method!r}: this experiment's {FILENAME} holds {', '.join(self.methods)}")
        return method


def _choice(payload: dict, key: str, choices: tuple[str, ...], where: str) -> str:
    value = payload.get(key)
    if value not in choices:
        raise MiaError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}; re-run the farm that writes it")
    return value


def _parse(payload: Any, where: str) -> Unlearning:
    """Structure and vocabulary only (ids are checked against keep.npy by ``check_against_keep``)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MiaError(f"{where}: not a {FORMAT} file (no \"format\": \"{FORMAT}\"); see the unlearning.json format in docs/unlearning.md")
    if payload.get("version") != VERSION:
        raise MiaError(f"{where}: version {payload.get('version')!r}, this mia-lightning reads version {VERSION}; re-run the farm in a new experiment")
    design = _choice(payload, "design", DESIGNS, where)
    scenario = _choice(payload, "scenario", SCENARIOS, where)
    evaluate = _choice(payload, "evaluate", EVALUATIONS, where)
    aggregation = _choice(payload, "aggregation", AGGREGATIONS, where)
    methods = payload.get("methods")
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        raise MiaError(f"{where}: methods {methods!r} must be a non-empty list of {', '.join(METHODS)}")
    chains = []
    for c, raw in enumerate(payload.get("chains") or []):
        try:
            method = _choice(raw, "method", tuple(methods), f"{where}: chain {c}")
            role = _choice(raw, "role", ROLES, f"{where}: chain {c}")
            versions = tuple(tuple(int(i) for i in _ids(v)) for v in raw["versions"])
            steps = tuple(Step(*(_ids(step.get(name, [])) for name in SAMPLE_SETS)) for step in raw["steps"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise MiaError(f"{where}: chain {c} is malformed ({err}); re-run the farm that writes it") from None
        if len(versions) != len(steps) + 1 or any(len(v) == 0 for v in versions):
            raise MiaError(f"{where}: chain {c} has {len(versions)} versions for {len(steps)} steps; a chain needs one version more than steps, none empty")
        chains.append(Chain(method, role, versions, steps))
    if not chains:
        raise MiaError(f"{where}: no chains; an unlearning experiment needs (original, unlearned) pairs")
    training = payload.get("training") or {}
    if not isinstance(training, dict) or any(not isinstance(v, dict) or v.get("method") not in METHODS for v in training.values()):
        raise MiaError(f"{where}: training must map model ids to {{\"method\": one of {', '.join(METHODS)}, ...}}")
    try:
        training_by_id = {int(k): v for k, v in training.items()}
    except ValueError:
        raise MiaError(f"{where}: training keys must be model ids") from None
    return Unlearning(design, scenario, evaluate, tuple(methods), aggregation, tuple(chains), training_by_id)


def version_members(keep: np.ndarray, version: tuple[int, ...]) -> np.ndarray:
    """bool [n]: the training set of a version (the union of its models' keep rows)."""
    return keep[list(version)].any(axis=0)


def check_against_keep(unlearning: Unlearning, keep: np.ndarray, where: str) -> None:
    """Every model id exists and every step's samples are where the format says (deleted in the version before, not after, ...)."""
    n_models, n_samples = keep.shape
    for model in unlearning.training:
        if not 0 <= model < n_models:
            raise MiaError(f"{where}: training names model {model}, but the experiment has models 0..{n_models - 1} (keep.npy)")
    for c, chain in enumerate(unlearning.chains):
        for version in chain.versions:
            missing = [m for m in version if not 0 <= m < n_models]
            if missing:
                raise MiaError(f"{where}: chain {c} names model {missing[0]}, but the experiment has models 0..{n_models - 1} (keep.npy); "
                               "the file belongs to another experiment or the farm is incomplete")
        members = [version_members(keep, v) for v in chain.versions]
        seen = np.logical_or.reduce(members)
        for s, step in enumerate(chain.steps):
            here = f"{where}: chain {c} step {s}"
            for name in SAMPLE_SETS:
                ids = getattr(step, name)
                if ids.size and (ids.min() < 0 or ids.max() >= n_samples):
                    raise MiaError(f"{here}: {name} sample id {int(ids[(ids < 0) | (ids >= n_samples)][0])} is outside the pool 0..{n_samples - 1}")
            before, after = members[s], members[s + 1]
            problems = (
                (step.deleted, ~before[step.deleted], "deletes sample {} which is not in the training set of version {}", s),
                (step.deleted, after[step.deleted], "deletes sample {} but version {} still trains on it", s + 1),
                (step.added, before[step.added], "adds sample {} which version {} already trains on", s),
                (step.added, ~after[step.added], "adds sample {} which version {} does not train on", s + 1),
                (step.remaining, ~(before & after)[step.remaining], "keeps sample {} which is not in both versions ({} and the next)", s),
            )
            for ids, bad, message, version in problems:
                if bad.any():
                    raise MiaError(f"{here}: " + message.format(int(ids[bad][0]), list(chain.versions[version])) + " (keep.npy); the file does not describe this experiment")
            used = step.negatives[seen[step.negatives]]
            if used.size:
                version = next(v for v, m in zip(chain.versions, members) if m[used[0]])
                raise MiaError(f"{here}: uses sample {int(used[0])} as a negative, but version {list(version)} trains on it (keep.npy); "
                               "the file does not describe this experiment")


def parse_unlearning(payload: Any, keep: np.ndarray, where: str = FILENAME) -> Unlearning:
    """Parse and validate an ``unlearning.json`` payload against the experiment's keep matrix."""
    unlearning = _parse(payload, where)
    check_against_keep(unlearning, keep, where)
    return unlearning


def load_unlearning(experiment: ExperimentDir) -> Unlearning:
    """The experiment's ``unlearning.json``, validated; a one-line error when it is missing or does not fit the experiment."""
    path = experiment.root / FILENAME
    if not path.is_file():
        raise MiaError(f"{path}: missing; this attack needs an experiment planned with plan.kind unlearning or unlearning_ulira "
                       "(see configs/unlearning/)")
    return parse_unlearning(load_json(path), experiment.keep, str(path))


def unlearning_problem(experiment: ExperimentDir | None, design: str | None = None) -> str | None:
    """Why an attack cannot use the experiment's ``unlearning.json`` (missing, invalid, or of another design), or None.

    Attacks call it in ``unmet_requirement``, which runs before an attack run is staged: a bad file is refused with nothing written.
    """
    if experiment is None or not (experiment.root / FILENAME).is_file():
        kind = f"unlearning_{design}" if design else "unlearning or unlearning_ulira"
        return f"needs {FILENAME} (an experiment planned with plan.kind {kind}; see configs/unlearning/)"
    try:
        unlearning = load_unlearning(experiment)
    except MiaError as err:
        return str(err)
    for model, entry in unlearning.training.items():  # another engine would have trained these as plain (or warm-started) models
        done = experiment.model_dir(model) / "done.json"
        engine = load_json(done).get("engine") if done.is_file() else "unlearning"
        if engine != "unlearning":
            return (f"{done}: model {model} was trained by farm.engine {engine}, but {FILENAME} makes it a {entry['method']} model, which only "
                    "farm.engine unlearning trains; re-run the farm in a new experiment with farm.engine: unlearning")
    if design is not None and unlearning.design != design:
        return f"needs the {FILENAME} of a plan.kind unlearning_{design} farm; {experiment.root / FILENAME} has design {unlearning.design}"
    return None
