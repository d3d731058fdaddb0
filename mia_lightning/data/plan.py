"""Membership plans: which pool samples each model trains on (``keep.npy`` + ``plan.json``).

A plan kind is a function ``(spec, labels, groups) -> Plan`` registered in ``PLAN_KINDS``; the
recipe picks it with ``plan.kind`` and passes kind-specific ``plan.options``, which the function
declares with ``@takes_options`` (checked before the pool is built). Every kind is seeded:
same arguments, same plan, bit for bit (numpy PCG64 seeded once).

- ``lira_half`` (default): every sample is IN for exactly half of the models (floor/ceil when N is
  odd) and every model gets as equal a share of the pool as possible (Carlini et al. 2022).
- ``bernoulli``: every (model, sample) membership is an independent fair coin flip, the design the
  one-run privacy audit needs (Steinke, Nasr and Jagielski 2023).

Both can reserve ``n_population`` samples that no model trains on (RMIA's population).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import FORMAT_VERSION

PLAN_KINDS: dict[str, str] = {
    "lira_half": "mia_lightning.data.plan:make_lira_plan",
    "bernoulli": "mia_lightning.data.plan:make_bernoulli_plan",
    "user_grouped": "mia_lightning.data.plans_users:make_user_grouped_plan",
    "unlearning": "mia_lightning.unlearning.plans:make_unlearning_plan",
    "unlearning_ulira": "mia_lightning.unlearning.plans:make_ulira_plan",
    "few_shot": "mia_lightning.data.images:make_few_shot_plan",
    "disjoint_shadows": "mia_lightning.attacks.shokri:make_disjoint_shadows_plan",
}
"""Plan kind -> ``module:function`` building it (workloads register theirs here)."""

INDEPENDENT_KINDS: frozenset[str] = frozenset({"bernoulli"})
"""Plan kinds whose memberships are independent fair coin flips per (model, sample)."""

DEPENDENT_KINDS: dict[str, str] = {
    "unlearning": "derives models from each other, originals and their unlearned versions retrained on the remaining data or fine-tuned",
    "unlearning_ulira": "derives models from each other, originals in complementary pairs and an exact and an inexact unlearned version of each",
}
"""Plan kinds whose models are, by design, not independent training runs: why, in one phrase."""


def model_dependence(plan: dict) -> str | None:
    """Why the models of a plan (plan.json as a dict) are not independent training runs, or None when they are.

    Shadow-model attacks (LiRA, RMIA, attack R, Shokri), pooled metrics over targets and every
    empirical-epsilon construction assume each model is its own training run on a membership drawn
    independently of the others. A plan breaks that when a model continues from another (``parents``;
    starting from a reference model trained on public data, ``info.reference_models``, is fine-tuning a
    pretrained model, not a dependence) or when its kind builds memberships from each other
    (``DEPENDENT_KINDS``). A directory without a
    plan (imported outputs) is taken as independent runs, as its exporter states.
    """
    kind = plan.get("kind")
    if kind in DEPENDENT_KINDS:
        return f"plan kind {kind!r} {DEPENDENT_KINDS[kind]}; the unlearning and ulira attacks are built for it"
    info = plan.get("info") if isinstance(plan.get("info"), dict) else {}
    public = {int(m) for m in info.get("reference_models") or []}
    parents = {child: parent for child, parent in (plan.get("parents") or {}).items() if int(parent) not in public}
    if parents:
        return f"{len(parents)} of its models continue training from another model of the farm (plan.json parents)"
    return None


@dataclass(frozen=True)
class PlanSpec:
    """What a plan is made from; stored in ``plan.json`` with the layout version."""

    dataset: str
    n_samples: int
    n_models: int
    seed: int = 0
    kind: str = "lira_half"
    n_population: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "version": FORMAT_VERSION}


@dataclass
class Plan:
    """A plan's arrays and extras; the runner writes each into the experiment directory.

    ``audit`` (bool [M, n], optional) says which samples count in the metrics when model m is the
    target (default: every sample outside ``population``); ``info`` is merged into plan.json;
    ``files`` are extra JSON contract files (e.g. ``unlearning.json``); ``parents`` maps a model
    derived from another one (e.g. an unlearned model fine-tuned from its original) to that model.
    """

    keep: np.ndarray
    population: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    audit: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    parents: dict[int, int] = field(default_factory=dict)


PlanFunction = TypeVar("PlanFunction", bound=Callable[..., Plan])


def plan_kind(kind: str) -> Callable[..., Plan]:
    """The function registered for ``kind`` (a one-line error naming the known kinds otherwise)."""
    if kind not in PLAN_KINDS:
        raise MiaError(f"--plan.kind {kind!r}: unknown plan kind; choose one of {', '.join(sorted(PLAN_KINDS))}")
    module, _, function = PLAN_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), function)


def takes_options(*names: str) -> Callable[[PlanFunction], PlanFunction]:
    """Declare the ``plan.options`` a plan kind's function takes, so a spec can be checked without building its data pool."""
    def declare(function: PlanFunction) -> PlanFunction:
        function.plan_options = names  # type: ignore[attr-defined]
        return function
    return declare


def check_plan_spec(kind: str, n_models: int, options: Mapping[str, Any]) -> None:
    """Refuse what a plan's settings get wrong before any data is loaded: the kind, too few models, an option the kind does not take (a study checks every setting this way before study.json is written)."""
    build = plan_kind(kind)
    if n_models < 2:
        raise MiaError(f"--plan.n_models {n_models}: a membership plan needs at least 2 models (a target and a shadow)")
    check_options(kind, options, getattr(build, "plan_options", ()))


def make_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """Build the plan of ``spec.kind`` and check its shapes."""
    check_plan_spec(spec.kind, spec.n_models, spec.options)
    plan = plan_kind(spec.kind)(spec, labels, groups)
    if plan.keep.shape != (spec.n_models, spec.n_samples) or plan.keep.dtype != np.bool_:
        raise MiaError(f"plan kind {spec.kind!r}: built keep {plan.keep.shape} {plan.keep.dtype}, expected bool {(spec.n_models, spec.n_samples)}")
    return plan


def check_options(kind: str, options: Mapping[str, Any], known: Sequence[str]) -> None:
    """Refuse a ``plan.options`` key the plan kind does not take: a typo would otherwise plan with the default silently."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes no options"
        raise MiaError(f"--plan.options.{unknown[0]}: unknown option of plan kind {kind}; {takes}")


def split_population(spec: PlanSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(population ids, audit ids), both sorted int64: ``n_population`` seeded samples no model trains on."""
    if not 0 <= spec.n_population < spec.n_samples - 1:
        raise MiaError(
            f"--plan.n_population {spec.n_population}: must be between 0 and {spec.n_samples - 2} "
            f"(the pool has {spec.n_samples} samples and at least 2 must be audited)"
        )
    order = rng.permutation(spec.n_samples)
    return np.sort(order[: spec.n_population]).astype(np.int64), np.sort(order[spec.n_population :])


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


@takes_options()
def make_lira_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """LiRA-style random halves: each audit sample IN for exactly half the models, balanced rows."""
    rng = np.random.default_rng(spec.seed)
    population, audit = split_population(spec, rng)
    n_in = np.full(audit.size, spec.n_models // 2)
    if spec.n_models % 2:
        n_in[rng.permutation(audit.size)[: audit.size // 2]] += 1
    ranks = np.argsort(rng.random((spec.n_models, audit.size)), axis=0).argsort(axis=0)
    sub = ranks < n_in[None, :]
    _balance_rows(sub, rng)
    keep = np.zeros((spec.n_models, spec.n_samples), dtype=bool)
    keep[:, audit] = sub
    return Plan(keep, population)


@takes_options()
def make_bernoulli_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """Independent fair coin flips: sample j is in model i's training set with probability 1/2, independently."""
    rng = np.random.default_rng(spec.seed)
    population, audit = split_population(spec, rng)
    keep = np.zeros((spec.n_models, spec.n_samples), dtype=bool)
    keep[:, audit] = rng.random((spec.n_models, audit.size)) < 0.5
    empty = np.flatnonzero(~keep.any(axis=1))
    if empty.size:
        raise MiaError(f"--plan.kind bernoulli: model {int(empty[0])} drew no training sample; use a larger pool or another --plan.seed")
    return Plan(keep, population, info={"membership": "independent coin flips, p = 1/2"})
