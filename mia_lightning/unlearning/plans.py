"""Unlearning plans: original models, their unlearned (or updated) versions, and the ``unlearning.json`` that relates them.

``plan.kind: unlearning`` reproduces the scenarios of Chen et al. ("When Machine Unlearning
Jeopardizes Privacy", ACM CCS 2021). The pool is split in a shadow half and a target half (the
attacker trains its classifier on shadow pairs and is tested on target pairs); each half has a
training region, from which every original draws ``train_size`` samples, and a reserve that no
original trains on (negatives, and the samples online learning adds). Scenarios:

- ``single``: every original has ``updates`` unlearned models, each deleting one of its samples;
- ``group``: the same with ``k`` samples per deletion (default 10);
- ``multi_version``: one chain per original, ``updates`` successive deletions; the attacker sees
  every intermediate version;
- ``online``: each update adds ``k`` reserve samples instead (the positives are the added ones);
- ``remaining``: the single-deletion models, evaluated on samples that stay ("in-in").

Methods: ``scratch`` (retraining without the deleted samples: ordinary models, trained by the
vectorised engine), ``sisa`` (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021: ``shards``
shard models per original, each trained slice by slice with a checkpoint per slice; an unlearned
version retrains only the affected shard from its first affected slice on, starting from the
checkpoint before it), and the inexact ``finetune`` (the original fine-tuned on what remains) and
``gradient_ascent`` (gradient ascent on the deleted samples); the last three need
``farm.engine: unlearning``.

``plan.kind: unlearning_ulira`` is the design of Hayes et al. ("Inexact Unlearning Needs More
Careful Evaluations to Avoid a False Sense of Privacy", IEEE SaTML 2025) for U-LiRA: ``originals``
models each train on a random half of the base samples plus a random half of ``candidates``
(every candidate is in exactly half of the originals) and then forget the candidates they saw,
once exactly (retraining from scratch on their base half) and once with the inexact method, on the
same farm.

Each plan checks its own ``unlearning.json`` against its keep matrix before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import yaml

from mia_lightning.data.plan import Plan, PlanSpec, check_options, takes_options
from mia_lightning.errors import MiaError
from mia_lightning.unlearning.contract import AGGREGATIONS, METHODS, SCENARIOS, Chain, Step, Unlearning, parse_unlearning

INEXACT_METHODS = ("finetune", "gradient_ascent")
EVALUATED = {"single": "deleted", "group": "deleted", "multi_version": "deleted", "online": "added", "remaining": "remaining"}


def _options(cls: type, spec: PlanSpec) -> Any:
    """The plan kind's options dataclass from ``plan.options`` (unknown keys and wrong types are one-line errors)."""
    known = {f.name: f for f in fields(cls)}
    check_options(spec.kind, spec.options, list(known))
    values = {}
    for name, value in spec.options.items():
        expected = type(known[name].default)
        if isinstance(value, str) and expected is not str:  # a command-line override arrives as text
            value = yaml.safe_load(value)
        allowed = (int,) if expected is int else (int, float) if expected is float else (expected,)
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, allowed):
            raise MiaError(f"--plan.options.{name} {value!r}: expected {expected.__name__}")
        values[name] = float(value) if expected is float else value
    return cls(**values)


def _check_models(spec: PlanSpec, n_models: int, layout: str) -> None:
    if spec.n_population:
        raise MiaError(f"--plan.n_population {spec.n_population}: plan kind {spec.kind} reserves its own negatives; set plan.n_population: 0")
    if spec.n_models != n_models:
        raise MiaError(f"--plan.n_models {spec.n_models}: plan kind {spec.kind} with these options (seed {spec.seed}) has {n_models} models "
                       f"({layout}); set plan.n_models: {n_models}")


@dataclass(frozen=True)
class ScenarioOptions:
    """``plan.options`` of ``plan.kind: unlearning`` (see the module docstring)."""

    scenario: str = "single"
    method: str = "scratch"
    originals: int = 10
    updates: int = 20
    train_size: int = 2000
    k: int = 0
    reserve_fraction: float = 0.2
    shards: int = 5
    slices: int = 4
    aggregation: str = "mean"
    finetune_epochs: int = 5
    ascent_steps: int = 10

    @property
    def per_update(self) -> int:
        """Samples deleted (or added) per update: ``k``, else 10 for group deletion and 1 otherwise."""
        return self.k or (10 if self.scenario == "group" else 1)

    def validate(self) -> None:
        for name, choices in (("scenario", SCENARIOS), ("method", METHODS), ("aggregation", AGGREGATIONS)):
            if getattr(self, name) not in choices:
                raise MiaError(f"--plan.options.{name} {getattr(self, name)!r}: choose one of {', '.join(choices)}")
        for name in ("originals", "updates", "train_size", "shards", "slices", "finetune_epochs", "ascent_steps"):
            if getattr(self, name) < 1:
                raise MiaError(f"--plan.options.{name} {getattr(self, name)}: must be at least 1")
        if self.k < 0 or self.scenario == "group" and self.per_update < 2:
            raise MiaError(f"--plan.options.k {self.k}: group deletion deletes at least 2 samples per update")
        if not 0.0 < self.reserve_fraction < 1.0:
            raise MiaError(f"--plan.options.reserve_fraction {self.reserve_fraction}: must be in (0, 1)")
        if self.method == "gradient_ascent" and self.scenario == "online":
            raise MiaError("--plan.options.method gradient_ascent: gradient ascent unlearns samples; online learning adds them, use scratch, sisa or finetune")
        if self.method == "sisa":
            if self.shards > self.train_size:
                raise MiaError(f"--plan.options.shards {self.shards}: more shards than training samples (train_size {self.train_size}); use at most {self.train_size}")
            if self.shards * self.slices > self.train_size:
                raise MiaError(f"--plan.options.slices {self.slices}: {self.shards} shards x {self.slices} slices exceed the {self.train_size} training samples; "
                               "every slice needs a sample")


@dataclass
class _Region:
    """One half of the pool: the training region the originals draw from and the reserves no original uses."""

    train: np.ndarray
    negatives: np.ndarray
    additions: np.ndarray


def _regions(opts: ScenarioOptions, n_samples: int, rng: np.random.Generator) -> dict[str, _Region]:
    order = rng.permutation(n_samples)
    regions = {}
    for role, side in (("shadow", order[: n_samples // 2]), ("target", order[n_samples // 2 :])):
        reserve = int(round(opts.reserve_fraction * side.size))
        negatives, additions = (side[: reserve // 2], side[reserve // 2 : reserve]) if opts.scenario == "online" else (side[:reserve], side[:0])
        regions[role] = _Region(np.sort(side[reserve:]), negatives, additions)
    needed = opts.updates * opts.per_update
    smallest = min(regions.values(), key=lambda r: r.train.size)
    if opts.train_size > smallest.train.size:
        raise MiaError(f"--plan.options.train_size {opts.train_size}: each half of the {n_samples}-sample pool has only {smallest.train.size} training samples "
                       f"after the {opts.reserve_fraction:g} reserve; use a smaller train_size or a larger pool")
    if 2 * needed > opts.train_size:
        raise MiaError(f"--plan.options.updates {opts.updates}: {opts.updates} updates x {opts.per_update} samples, twice (deleted and remaining), "
                       f"exceed train_size {opts.train_size}")
    for name in ("negatives",) + (("additions",) if opts.scenario == "online" else ()):
        have = min(getattr(r, name).size for r in regions.values())
        if needed > have:
            raise MiaError(f"--plan.options.updates {opts.updates}: each original needs {needed} distinct {name} but the reserve has {have}; "
                           "raise reserve_fraction, use a larger pool or fewer updates")
    return regions


class _Builder:
    """Accumulates models (keep rows, parents, how the engine trains them) and the chains of ``unlearning.json``."""

    def __init__(self, n_samples: int) -> None:
        self.n_samples = n_samples
        self.rows: list[np.ndarray] = []
        self.parents: dict[int, int] = {}
        self.training: dict[int, dict] = {}
        self.chains: list[Chain] = []

    def add(self, members: np.ndarray, parent: int | None = None, training: dict | None = None) -> int:
        index = len(self.rows)
        row = np.zeros(self.n_samples, dtype=bool)
        row[members] = True
        self.rows.append(row)
        if parent is not None:
            self.parents[index] = parent
        if training is not None:
            self.training[index] = training
        return index

    @property
    def keep(self) -> np.ndarray:
        return np.stack(self.rows) if self.rows else np.zeros((0, self.n_samples), dtype=bool)


class _SisaModels:
    """SISA shard models: each id's ordered slices; new versions retrain only the shards a step touches."""

    def __init__(self, builder: _Builder, opts: ScenarioOptions) -> None:
        self.builder, self.opts = builder, opts
        self.slices: dict[int, list[np.ndarray]] = {}

    def original(self, train: np.ndarray) -> tuple[int, ...]:
        """S shard models of one original, each on its shard's R slices, from scratch."""
        ids = []
        for shard in np.array_split(train, self.opts.shards):
            parts = np.array_split(shard, self.opts.slices)
            ids.append(self._model(parts, None, 0))
        return tuple(ids)

    def _model(self, parts: list[np.ndarray], parent: int | None, resume_after: int) -> int:
        if parts[0].size == 0:
            raise MiaError(f"--plan.options.slices {self.opts.slices}: a deletion empties the first slice of a shard; use fewer slices or shards, or a larger train_size")
        training = {"method": "sisa", "slices": [p.tolist() for p in parts], "resume_after": resume_after}
        index = self.builder.add(np.concatenate(parts), parent, training)
        self.slices[index] = parts
        return index

    def delete(self, version: tuple[int, ...], deleted: np.ndarray) -> tuple[int, ...]:
        """The next version: each shard holding a deleted sample retrained from its first affected slice (others unchanged)."""
        new = list(version)
        for position, model in enumerate(version):
            parts = self.slices[model]
            hit = [bool(np.isin(p, deleted).any()) for p in parts]
            if any(hit):
                first = hit.index(True)
                new[position] = self._model([p[~np.isin(p, deleted)] for p in parts], model, first)
        return tuple(new)

    def add(self, version: tuple[int, ...], added: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
        """The next version: added samples join a random shard's last slice; that shard retrains its last slice only."""
        new = list(version)
        shard_of = rng.integers(0, len(version), added.size)
        for position in np.unique(shard_of):
            model = version[position]
            parts = list(self.slices[model])
            parts[-1] = np.concatenate([parts[-1], added[shard_of == position]])
            new[position] = self._model(parts, model, len(parts) - 1)
        return tuple(new)


def _next_single(builder: _Builder, opts: ScenarioOptions, model: int, members: np.ndarray, deleted: np.ndarray) -> int:
    """The next version of a single model: retrained from scratch, fine-tuned from it, or gradient ascent on the deleted samples."""
    if opts.method == "scratch":
        return builder.add(members)
    if opts.method == "finetune":
        return builder.add(members, model, {"method": "finetune", "epochs": opts.finetune_epochs})
    return builder.add(members, model, {"method": "gradient_ascent", "forget": deleted.tolist(), "steps": opts.ascent_steps})


def _target_rows(unlearning: Unlearning, evaluate: str) -> list[int]:
    """Rows of the target side: original models (all shards) for deleted / remaining samples, updated models for added ones."""
    rows: set[int] = set()
    for chain in unlearning.chains:
        if chain.role == "target":
            rows.update(chain.versions[0] if evaluate != "added" else [m for v in chain.versions[1:] for m in v if m not in chain.versions[0]])
    return sorted(rows)


@takes_options(*ScenarioOptions.__dataclass_fields__)
def make_unlearning_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """Chen et al.'s scenarios: originals on both halves of the pool, their unlearned versions, and ``unlearning.json``."""
    opts = _options(ScenarioOptions, spec)
    opts.validate()
    rng = np.random.default_rng(spec.seed)
    regions = _regions(opts, spec.n_samples, rng)
    builder = _Builder(spec.n_samples)
    sisa = _SisaModels(builder, opts) if opts.method == "sisa" else None
    k, chain_steps = opts.per_update, opts.updates if opts.scenario == "multi_version" else 1
    originals = []
    for role in ("shadow", "target"):
        for _ in range(opts.originals):
            train = rng.choice(regions[role].train, opts.train_size, replace=False)
            version = sisa.original(train) if sisa else (builder.add(train),)
            originals.append((role, train, version))
    for role, train, original in originals:
        region = regions[role]
        picks = rng.permutation(train)
        deleted_all, remaining_all = picks[: opts.updates * k].reshape(opts.updates, k), picks[opts.updates * k : 2 * opts.updates * k].reshape(opts.updates, k)
        negatives_all = rng.choice(region.negatives, (opts.updates, k), replace=False)
        added_all = rng.choice(region.additions, (opts.updates, k), replace=False) if opts.scenario == "online" else np.zeros((opts.updates, 0), dtype=np.int64)
        for first in range(0, opts.updates, chain_steps):
            versions, steps, members = [original], [], np.sort(train)
            for u in range(first, first + chain_steps):
                deleted = np.sort(deleted_all[u]) if opts.scenario != "online" else np.zeros(0, dtype=np.int64)
                added = np.sort(added_all[u])
                members = np.union1d(np.setdiff1d(members, deleted), added)
                before = versions[-1]
                if sisa:
                    after = sisa.add(before, added, rng) if added.size else sisa.delete(before, deleted)
                else:
                    after = (_next_single(builder, opts, before[0], members, deleted),)
                versions.append(after)
                steps.append(Step(deleted, added, np.sort(remaining_all[u]), np.sort(negatives_all[u])))
            builder.chains.append(Chain(opts.method, role, tuple(versions), tuple(steps)))
    unlearning = Unlearning("scenarios", opts.scenario, EVALUATED[opts.scenario], (opts.method,), opts.aggregation, tuple(builder.chains), builder.training)
    keep = builder.keep
    per_original = f"{opts.shards} shard models" if sisa else "1 model"
    _check_models(spec, keep.shape[0], f"2 x {opts.originals} originals of {per_original} and their {opts.scenario} {opts.method} updates")
    payload = unlearning.to_json()
    parse_unlearning(payload, keep, "unlearning plan")  # the plan's own invariants, checked before anything is written
    info = {
        "target_models": _target_rows(unlearning, unlearning.evaluate),
        "unlearning": {"design": "scenarios", "scenario": opts.scenario, "method": opts.method, "originals_per_side": opts.originals,
                       "updates": opts.updates, "per_update": k, "train_size": opts.train_size},
    }
    return Plan(keep, info=info, files={"unlearning.json": payload}, parents=builder.parents)


@dataclass(frozen=True)
class ULiRAOptions:
    """``plan.options`` of ``plan.kind: unlearning_ulira``."""

    inexact: str = "finetune"
    candidates: int = 200
    finetune_epochs: int = 5
    ascent_steps: int = 10

    def validate(self, n_samples: int, n_models: int) -> None:
        if n_models % 6 or n_models < 18:
            raise MiaError(f"--plan.n_models {n_models}: plan kind unlearning_ulira has 3 models per original (original, exact and inexact "
                           "unlearned) and an even number of originals, at least 6; use a multiple of 6, at least 18")
        if self.inexact not in INEXACT_METHODS:
            raise MiaError(f"--plan.options.inexact {self.inexact!r}: choose one of {', '.join(INEXACT_METHODS)}")
        if not 2 <= self.candidates <= n_samples - 2:
            raise MiaError(f"--plan.options.candidates {self.candidates}: must be between 2 and {n_samples - 2} (the pool has {n_samples} samples)")
        for name in ("finetune_epochs", "ascent_steps"):
            if getattr(self, name) < 1:
                raise MiaError(f"--plan.options.{name} {getattr(self, name)}: must be at least 1")


def complementary_halves(ids: np.ndarray, n_pairs: int, rng: np.random.Generator) -> list[np.ndarray]:
    """2 x ``n_pairs`` subsets of ``ids``: pair i is a random half and its complement, so every id is in exactly one model of each pair."""
    halves = []
    for _ in range(n_pairs):
        order = rng.permutation(ids)
        halves += [np.sort(order[: ids.size // 2]), np.sort(order[ids.size // 2 :])]
    return halves


@takes_options(*ULiRAOptions.__dataclass_fields__)
def make_ulira_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """M originals in complementary pairs (half of the base + half of the candidates each), each unlearned exactly and inexactly.

    Models 0..M-1 are the originals (2i and 2i+1 split the candidates and the base between them),
    M..2M-1 their exact unlearned versions (retrained from scratch on their base half), 2M..3M-1
    the inexact ones (derived from the original). ``n_models`` = 3M. U-LiRA leaves a target's pair
    out of its shadows, so every candidate has as many "forgot" as "never saw" shadows.
    """
    opts = _options(ULiRAOptions, spec)
    opts.validate(spec.n_samples, spec.n_models)
    _check_models(spec, spec.n_models, "originals, exact and inexact unlearned models")
    n_originals = spec.n_models // 3
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(spec.n_samples)
    candidates, base = np.sort(order[: opts.candidates]), np.sort(order[opts.candidates :])
    forgotten = complementary_halves(candidates, n_originals // 2, rng)
    kept = complementary_halves(base, n_originals // 2, rng)
    builder = _Builder(spec.n_samples)
    originals = [builder.add(np.union1d(kept[o], forgotten[o])) for o in range(n_originals)]
    exact = [builder.add(kept[o]) for o in range(n_originals)]
    if opts.inexact == "finetune":
        inexact = [builder.add(kept[o], originals[o], {"method": "finetune", "epochs": opts.finetune_epochs}) for o in range(n_originals)]
    else:
        inexact = [builder.add(kept[o], originals[o], {"method": "gradient_ascent", "forget": forgotten[o].tolist(), "steps": opts.ascent_steps})
                   for o in range(n_originals)]
    for o in range(n_originals):
        remaining = np.sort(rng.choice(kept[o], min(forgotten[o].size, kept[o].size), replace=False))
        step = Step(forgotten[o], np.zeros(0, dtype=np.int64), remaining, np.setdiff1d(candidates, forgotten[o]))
        role = "shadow" if o % 2 == 0 else "target"
        for method, models in ((opts.inexact, inexact), ("scratch", exact)):
            builder.chains.append(Chain(method, role, ((originals[o],), (models[o],)), (step,)))
    unlearning = Unlearning("ulira", "group", "deleted", (opts.inexact, "scratch"), "mean", tuple(builder.chains), builder.training)
    keep = builder.keep
    payload = unlearning.to_json()
    parse_unlearning(payload, keep, "unlearning_ulira plan")
    info = {
        "target_models": originals,
        "unlearning": {"design": "ulira", "originals": n_originals, "candidates": opts.candidates, "inexact": opts.inexact,
                       "exact_models": exact, "inexact_models": inexact},
    }
    return Plan(keep, info=info, files={"unlearning.json": payload}, parents=builder.parents)
